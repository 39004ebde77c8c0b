"""Training and evaluation loops for a DLRM over torchrec ``Batch``es."""

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torchrec.datasets.utils import Batch
from tqdm import tqdm

from torchrec_fiited.app.metrics import EvalMetrics


@dataclass
class TrainResult:
    """What a training run did.

    Args:
        steps: optimizer steps taken.
        seconds: wall time of the training steps.
        examples: examples seen.
        losses: training loss of every step (this rank's batch slice).
        global_losses: loss of every step over the whole global batch (the mean over ranks);
            equal to ``losses`` in a single process.
    """

    steps: int = 0
    seconds: float = 0.0
    examples: int = 0
    losses: List[float] = field(default_factory=list)
    global_losses: List[float] = field(default_factory=list)

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0


def train(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    dense_optimizer: torch.optim.Optimizer,
    max_steps: Optional[int] = None,
    progress: bool = True,
    result: Optional[TrainResult] = None,
    on_step: Optional[Callable[[int], None]] = None,
    reduce_loss: Optional[Callable[[torch.Tensor], float]] = None,
) -> TrainResult:
    """One pass over ``batches`` (or until ``result`` has ``max_steps`` steps). The embedding
    update is fused into backward, so only the dense optimizer steps here. ``on_step(steps_done)``
    runs after every step, outside the timed region, as does ``reduce_loss(loss)``, which gives
    the loss of the global batch (default: this batch's)."""
    result = result or TrainResult()
    model.train()
    # total and initial: the bar counts the run's steps, across epochs and a resume.
    bar = tqdm(batches, disable=not progress, desc="train", leave=False, total=max_steps,
               initial=result.steps, unit="step")
    for batch in bar:
        if max_steps is not None and result.steps >= max_steps:
            break
        start = time.perf_counter()
        logits = model(batch.dense_features, batch.sparse_features).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        dense_optimizer.zero_grad()
        loss.backward()
        dense_optimizer.step()
        result.seconds += time.perf_counter() - start
        result.steps += 1
        result.examples += batch.labels.numel()
        result.losses.append(loss.item())
        result.global_losses.append(reduce_loss(loss) if reduce_loss else result.losses[-1])
        if on_step is not None:
            on_step(result.steps)
        if progress:
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}", ex_s=f"{result.examples_per_second:,.0f}")
    return result


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[Tuple[Batch, int]]) -> torch.Tensor:
    """float ``[N, 3]`` rows of (logit, label, is_real) over every row of every
    ``(batch, num_valid)``, in eval mode; the first ``num_valid`` rows of a batch are real, the
    rest padding. Every row is kept, so ranks with equal batches return equal shapes."""
    model.eval()
    rows = []
    for batch, num_valid in batches:
        logits = model(batch.dense_features, batch.sparse_features).reshape(-1).float().cpu()
        is_real = (torch.arange(logits.numel()) < num_valid).float()
        rows.append(torch.stack([logits, batch.labels.float().cpu(), is_real], dim=1))
    model.train()
    return torch.cat(rows)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Batch]) -> Dict[str, float]:
    """AUC, accuracy, log loss and normalized entropy over ``batches`` in eval mode."""
    model.eval()
    metrics = EvalMetrics(from_logits=True)
    for batch in batches:
        logits = model(batch.dense_features, batch.sparse_features).squeeze(-1)
        metrics.update(logits, batch.labels)
    model.train()
    return metrics.compute()
