"""``python -m torchrec_fiited.train``: the Hydra training app.

Its configs are the repository's ``conf/``; an installed package ships a copy of them as
``torchrec_fiited/conf`` (see ``setup.py``), which is used when present.

Examples::

    python -m torchrec_fiited.train                          # FIITED on the synthetic data
    python -m torchrec_fiited.train emb=full                 # the unpruned baseline
    python -m torchrec_fiited.train dataset=criteo_tsv dataset.path=/data/train.txt budget=0.1
    python -m torchrec_fiited.train -m +experiment=budget_sweep   # the paper's Fig. 8 sweep
    torchrun --standalone --nproc_per_node=2 -m torchrec_fiited.train emb=full \
        hydra.run.dir=outputs/dist train.checkpoint_every=50       # 2 processes, tables sharded
    ... the same command with train.resume=true                  # continue from the checkpoint
"""

import logging
import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from torchrec_fiited.app.recipe import TrainRecipe

log = logging.getLogger(__name__)


def config_dir() -> str:
    """The installed package's ``torchrec_fiited/conf``, else the checkout's top-level ``conf/``."""
    package = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(package, "conf")
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package), "conf")


class _DropThirdPartyInfo(logging.Filter):
    """Drops records below WARNING logged through the root logger from ``fbgemm_gpu``'s files.

    FBGEMM's TBE logs every constructor argument with ``logging.info`` (the root logger, so no
    named logger can be lowered): about 10 long lines per table group and run.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}fbgemm_gpu{os.sep}" not in record.pathname


def quiet_third_party_logs() -> None:
    """Keep the app's output to its own lines: no FBGEMM INFO dump, no per-KJT torch.fx notice."""
    root = logging.getLogger()
    if not any(isinstance(f, _DropThirdPartyInfo) for f in root.filters):
        root.addFilter(_DropThirdPartyInfo())
    # torch warns once per process that is_fx_tracing() covers export too, from torchrec's KJT
    # constructor (torch.fx's ProxyableClassMeta): nothing the app or a user can act on.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_third_party_logs()
    plain = OmegaConf.to_container(cfg, resolve=True)
    hc = HydraConfig.get()
    plain["emb_name"] = plain.get("label") or hc.runtime.choices.get("emb", plain["emb"]["method"])
    plain["dataset"] = _absolute_paths(plain["dataset"])
    recipe = TrainRecipe(plain, hc.runtime.output_dir)
    metrics = recipe.run()
    if not recipe.is_main:
        return
    if "stopped_at_step" in metrics:
        print(f"stopped after step {metrics['stopped_at_step']} (train.stop_after_steps); "
              "continue with train.resume=true")
        return
    if "infeasible" in metrics:
        print(f"emb={metrics['emb']} budget={metrics['budget']}: infeasible: {metrics['infeasible']}")
        return
    line = (
        f"emb={metrics['emb']} budget={metrics['budget']} dataset={metrics['dataset']} "
        f"AUC={metrics['test_auc']:.4f} accuracy={metrics['test_accuracy']:.4f} "
        f"logloss={metrics['test_logloss']:.4f} NE={metrics['test_ne']:.4f} "
        f"embedding_bytes={metrics['embedding_bytes']:,} (full {metrics['embedding_bytes_full']:,}) "
        f"steps={metrics['steps']} world_size={metrics['world_size']} "
        f"{metrics['examples_per_second']:,.0f} ex/s"
    )
    _to_log_files(line)
    print(line)


def _to_log_files(line: str) -> None:
    """The run's log file (Hydra's train.log) keeps ``line``; the console gets it once, by print."""
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _absolute_paths(dataset: dict) -> dict:
    """Hydra changes nothing about the cwd here, but make paths absolute for the record."""
    return {
        k: (hydra.utils.to_absolute_path(v) if k.endswith("path") and isinstance(v, str) else v)
        for k, v in dataset.items()
    }


if __name__ == "__main__":
    main()
