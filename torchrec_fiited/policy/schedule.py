"""When pruning cycles run: every T steps, or on TorchRec ITEP's front-loaded schedule."""

SCHEDULES = ("interval", "itep")


def cycle_due(steps_done: int, schedule: str, interval: int, warmup_steps: int) -> bool:
    """Whether a cycle runs after training step number ``steps_done`` (1-based).

    "interval": every ``interval`` steps from ``warmup_steps`` on (``interval`` 0 disables).
    "itep": TorchRec ITEP's schedule (``torchrec/modules/itep_modules.py``): every 3 steps
    below 10, every 30 below 100, every 300 below 1000, then every ``interval``.
    """
    if interval <= 0 or steps_done < warmup_steps:
        return False
    s = steps_done
    if schedule == "itep":
        early = (s < 10 and s % 3 == 0) or (s < 100 and s % 30 == 0) or (s < 1000 and s % 300 == 0)
        return early or s % interval == 0
    return s % interval == 0
