"""How far a quantized output is from its float reference: top-1 agreement, KL, SQNR (numpy).

* :func:`top1_agreement`: the share of samples whose arg-max class is the same;
* :func:`kl_divergence`: mean ``KL(softmax(reference) || softmax(test))`` in nats;
* :func:`sqnr_db`: ``10 log10(sum ref**2 / sum (test - ref)**2)``, the signal-to-quantization
  noise ratio in dB (``inf`` when equal, ``-inf`` for noise on an all-zero reference);
  :class:`SqnrAccumulator` adds it up over batches.

>>> import numpy as np
>>> ref = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
>>> top1_agreement(ref, ref + [[0, 0, 0], [0, -3, 0]])
0.5
>>> round(sqnr_db(ref, ref + 0.1), 2)
23.98
"""

from __future__ import annotations

import math

import numpy as np

from vbxfx.errors import CheckError

__all__ = ["top1_agreement", "kl_divergence", "sqnr_db", "SqnrAccumulator", "log_softmax"]


def _pair(reference, test, what: str) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(test, dtype=np.float64)
    if ref.shape != out.shape:
        raise CheckError(f"{what}: reference has shape {ref.shape}, the tested output "
                         f"{out.shape}; they must be equal")
    return ref, out


def _logits(reference, test, what: str) -> tuple[np.ndarray, np.ndarray]:
    ref, out = _pair(reference, test, what)
    if ref.ndim != 2 or ref.shape[0] == 0 or ref.shape[1] < 2:
        raise CheckError(f"{what} takes class scores [N, classes] with N >= 1 and at least 2 "
                         f"classes, got shape {ref.shape}")
    return ref, out


def top1_agreement(reference, test) -> float:
    """Share of rows of ``[N, classes]`` scores whose arg-max is the same (0..1)."""
    ref, out = _logits(reference, test, "top1_agreement")
    return float(np.mean(ref.argmax(axis=1) == out.argmax(axis=1)))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of ``[N, classes]``, stable for large values."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def kl_divergence(reference, test) -> float:
    """Mean over rows of ``KL(softmax(reference) || softmax(test))`` in nats (>= 0)."""
    ref, out = _logits(reference, test, "kl_divergence")
    lp, lq = log_softmax(ref), log_softmax(out)
    return float(max(0.0, np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1))))


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db(reference, test) -> float:
    """``10 log10(sum reference**2 / sum (test - reference)**2)`` in dB; inf when equal."""
    ref, out = _pair(reference, test, "sqnr_db")
    return _db(float(np.sum(ref * ref)), float(np.sum((out - ref) ** 2)))


class SqnrAccumulator:
    """SQNR over many batches: ``add(ref, test)`` each batch, then :attr:`db`.

    >>> acc = SqnrAccumulator()
    >>> acc.add(np.ones(4), np.ones(4)); acc.add(np.ones(4), np.zeros(4))
    >>> round(acc.db, 2)
    3.01
    """

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def add(self, reference, test) -> None:
        ref, out = _pair(reference, test, "SqnrAccumulator.add")
        self.signal += float(np.sum(ref * ref))
        self.noise += float(np.sum((out - ref) ** 2))

    @property
    def db(self) -> float:
        return _db(self.signal, self.noise)
