"""Evaluation metrics for binary CTR prediction: AUC, accuracy, log loss and NE.

* AUC: ``torchmetrics`` ``BinaryAUROC`` (exact, all predictions kept).
* Accuracy: ``torchmetrics`` ``BinaryAccuracy``; an example is predicted positive
  when its probability is strictly above 0.5.
* Log loss: mean binary cross-entropy in nats, probabilities clipped to
  ``[eps, 1 - eps]`` so that a confident mistake costs a finite amount.
* NE (normalized entropy, He et al. 2014): log loss divided by the entropy of the
  base CTR ``p`` (the mean label), ``-(p log p + (1 - p) log(1 - p))``; 1.0 is
  the score of always predicting ``p``, lower is better.

AUC and NE are undefined when the labels are all equal; they are then NaN.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

METRIC_NAMES = ("auc", "accuracy", "logloss", "ne")


class EvalMetrics:
    """Streaming accumulator of AUC, accuracy, log loss and NE over batches."""

    def __init__(self, from_logits: bool = False, eps: float = 1e-7) -> None:
        """Creates an empty accumulator.

        Args:
            from_logits: Predictions passed to :meth:`update` are logits (sigmoid
                applied here) rather than probabilities.
            eps: Probabilities are clipped to ``[eps, 1 - eps]`` for the log loss.

        Raises:
            ValueError: If eps is not in (0, 0.5).
        """
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps}")
        self.from_logits = from_logits
        self.eps = eps
        self._auc = BinaryAUROC()
        self._accuracy = BinaryAccuracy(threshold=0.5)
        self.reset()

    def reset(self) -> None:
        """Forgets everything seen so far."""
        self._auc.reset()
        self._accuracy.reset()
        self._count = 0
        self._positives = 0.0
        self._logloss_sum = 0.0

    @property
    def count(self) -> int:
        """Number of examples seen since the last reset."""
        return self._count

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        """Adds a batch.

        Args:
            preds: float ``[B]`` or ``[B, 1]`` probabilities (or logits if ``from_logits``).
            labels: ``[B]`` or ``[B, 1]`` labels in {0, 1}, any numeric dtype.

        Raises:
            ValueError: If the sizes differ, a label is not 0/1, or a probability is
                outside [0, 1] (or NaN) without ``from_logits``.
        """
        preds = preds.detach().reshape(-1).double().cpu()
        labels = labels.detach().reshape(-1).double().cpu()
        if preds.numel() != labels.numel():
            raise ValueError(
                f"predictions have {preds.numel()} elements but labels have {labels.numel()}"
            )
        bad = (labels != 0) & (labels != 1)
        if bool(bad.any()):
            raise ValueError(f"labels must be 0 or 1, got {labels[bad][0].item()!r}")
        probs = torch.sigmoid(preds) if self.from_logits else preds
        if not bool(((probs >= 0) & (probs <= 1)).all()):
            worst = probs[~((probs >= 0) & (probs <= 1))][0].item()
            hint = " (a NaN logit?)" if self.from_logits else "; pass from_logits=True for logits"
            raise ValueError(f"probability {worst!r} is outside [0, 1]{hint}")
        if probs.numel() == 0:
            return
        clipped = probs.clamp(self.eps, 1.0 - self.eps)
        self._logloss_sum += F.binary_cross_entropy(clipped, labels, reduction="sum").item()
        self._count += labels.numel()
        self._positives += labels.sum().item()
        targets = labels.long()
        self._auc.update(probs, targets)
        self._accuracy.update(probs, targets)

    def compute(self) -> dict[str, float]:
        """Returns the metrics of everything seen since the last reset.

        Returns:
            ``{"auc", "accuracy", "logloss", "ne"}`` as floats; ``auc`` and ``ne``
            are NaN if the labels are all equal.

        Raises:
            ValueError: If no example was seen.
        """
        if self._count == 0:
            raise ValueError("EvalMetrics.compute() called before any example was added")
        logloss = self._logloss_sum / self._count
        ctr = self._positives / self._count
        both_classes = 0.0 < ctr < 1.0
        return {
            "auc": float(self._auc.compute()) if both_classes else math.nan,
            "accuracy": float(self._accuracy.compute()),
            "logloss": logloss,
            "ne": logloss / base_entropy(ctr) if both_classes else math.nan,
        }


def base_entropy(ctr: float) -> float:
    """Entropy in nats of a Bernoulli(ctr) label: ``-(p log p + (1 - p) log(1 - p))``.

    Raises:
        ValueError: If ctr is outside [0, 1].
    """
    if not 0.0 <= ctr <= 1.0:
        raise ValueError(f"ctr must be in [0, 1], got {ctr}")
    if ctr in (0.0, 1.0):
        return 0.0
    return -(ctr * math.log(ctr) + (1.0 - ctr) * math.log(1.0 - ctr))


def compute_metrics(
    preds: torch.Tensor, labels: torch.Tensor, from_logits: bool = False,
    eps: Optional[float] = None,
) -> dict[str, float]:
    """One-shot version of :class:`EvalMetrics` for tensors already in memory.

    Args:
        preds: float ``[N]`` probabilities (or logits if ``from_logits``).
        labels: ``[N]`` labels in {0, 1}.
        from_logits: Whether ``preds`` are logits.
        eps: Log-loss clipping (default 1e-7).

    Returns:
        The dict of :meth:`EvalMetrics.compute`.
    """
    metrics = EvalMetrics(from_logits=from_logits, eps=1e-7 if eps is None else eps)
    metrics.update(preds, labels)
    return metrics.compute()
