"""``python -m torchrec_fiited.train``: the Hydra training app (configs under ``conf/``).

Examples::

    python -m torchrec_fiited.train                          # FIITED on the synthetic data
    python -m torchrec_fiited.train emb=full                 # the unpruned baseline
    python -m torchrec_fiited.train dataset=criteo_tsv dataset.path=/data/train.txt budget=0.1
    python -m torchrec_fiited.train -m +experiment=budget_sweep   # the paper's Fig. 8 sweep
"""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from torchrec_fiited.app.recipe import TrainRecipe

log = logging.getLogger(__name__)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    plain = OmegaConf.to_container(cfg, resolve=True)
    hc = HydraConfig.get()
    plain["emb_name"] = hc.runtime.choices.get("emb", plain["emb"]["method"])
    plain["dataset"] = _absolute_paths(plain["dataset"])
    metrics = TrainRecipe(plain, hc.runtime.output_dir).run()
    if "infeasible" in metrics:
        print(f"emb={metrics['emb']} budget={metrics['budget']}: infeasible: {metrics['infeasible']}")
        return
    line = (
        f"emb={metrics['emb']} budget={metrics['budget']} dataset={metrics['dataset']} "
        f"AUC={metrics['test_auc']:.4f} accuracy={metrics['test_accuracy']:.4f} "
        f"logloss={metrics['test_logloss']:.4f} NE={metrics['test_ne']:.4f} "
        f"embedding_bytes={metrics['embedding_bytes']:,} (full {metrics['embedding_bytes_full']:,}) "
        f"steps={metrics['steps']} {metrics['examples_per_second']:,.0f} ex/s"
    )
    log.info(line)
    print(line)


def _absolute_paths(dataset: dict) -> dict:
    """Hydra changes nothing about the cwd here, but make paths absolute for the record."""
    return {
        k: (hydra.utils.to_absolute_path(v) if k.endswith("path") and isinstance(v, str) else v)
        for k, v in dataset.items()
    }


if __name__ == "__main__":
    main()
