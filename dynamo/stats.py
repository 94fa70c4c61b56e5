"""Paired-bootstrap confidence intervals for comparing runs over the same evaluation units.

Two runs of one configuration family evaluate the same windows (same split, seqlen, tokenizer)
or the same multiple-choice questions, so their per-unit values pair up. Every comparison the
harness prints is a statistic of those paired samples with a BCa interval from
`scipy.stats.bootstrap(paired=True)`, resampling units with replacement and a fixed seed, so a
table regenerates to the same digits.

The statistics (all over equal-length windows, where token PPL = exp(mean window NLL)):
- `ppl_ratio(nll_a, nll_b)`: PPL_b / PPL_a = exp(mean(b) - mean(a)).
- `gap_closed(nll_ref, nll_base, nll_new)`: (PPL_base - PPL_new) / (PPL_base - PPL_ref), the share
  of the base method's PPL gap to the reference that the new method closes.
- `damage_removed(kl_base, kl_new)`: 1 - mean(kl_new) / mean(kl_base), the share of the base's
  KL-to-FP16 damage that the new method removes.
- `mean_difference(a, b)`: mean(b) - mean(a), e.g. of per-question 0/1 correctness.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
N_RESAMPLES = 2000
SEED = 0


class PairingError(ValueError):
    """The samples do not pair up (different lengths, or too few units to resample)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its paired-bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    confidence: float
    n: int          # paired units (windows or questions)
    method: str     # "BCa", or "percentile" where BCa is undefined (e.g. constant jackknife)

    def excludes(self, value: float) -> bool:
        """True when the whole interval lies on one side of `value` (a significant difference)."""
        return bool(self.low > value or self.high < value)

    def to_dict(self) -> dict:
        return asdict(self)


def _as_paired(samples: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    arrays = tuple(np.asarray(s, dtype=np.float64).ravel() for s in samples)
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise PairingError(f"paired samples differ in length ({sorted(lengths)}); compare runs over the same "
                           "windows (same eval.seqlen, eval.max_windows and split)")
    if lengths.pop() < 2:
        raise PairingError("a paired bootstrap needs at least 2 units per sample")
    for a in arrays:
        if not np.all(np.isfinite(a)):
            raise PairingError("paired samples contain NaN or Inf")
    return arrays


def paired_bootstrap(statistic: Callable[..., np.ndarray], *samples, confidence: float = CONFIDENCE,
                     n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Interval:
    """CI of `statistic(*samples, axis=-1)` resampling the paired units together.

    `statistic` must be vectorised along `axis` (scipy passes batches of resamples)."""
    arrays = _as_paired(samples)
    estimate = float(statistic(*arrays, axis=-1))
    method = "BCa"
    with warnings.catch_warnings():
        # BCa warns (and returns NaN) when the jackknife is degenerate, e.g. identical runs.
        warnings.simplefilter("ignore", category=scipy_stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", category=RuntimeWarning)
        result = scipy_stats.bootstrap(arrays, statistic, paired=True, vectorized=True, axis=-1,
                                       confidence_level=confidence, n_resamples=n_resamples, method="BCa",
                                       random_state=np.random.default_rng(seed))
        low, high = result.confidence_interval
        if not (np.isfinite(low) and np.isfinite(high)):
            method = "percentile"
            result = scipy_stats.bootstrap(arrays, statistic, paired=True, vectorized=True, axis=-1,
                                           confidence_level=confidence, n_resamples=n_resamples,
                                           method="percentile", random_state=np.random.default_rng(seed))
            low, high = result.confidence_interval
    if not (np.isfinite(low) and np.isfinite(high)):  # every resample identical: no spread at all
        low = high = estimate
    return Interval(estimate=estimate, low=float(low), high=float(high), confidence=confidence,
                    n=len(arrays[0]), method=method)


def _ppl_ratio(a, b, axis=-1):
    return np.exp(np.mean(b, axis=axis) - np.mean(a, axis=axis))


def _gap_closed(ref, base, new, axis=-1):
    ppl_ref, ppl_base, ppl_new = (np.exp(np.mean(x, axis=axis)) for x in (ref, base, new))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (ppl_base - ppl_new) / (ppl_base - ppl_ref)


def _damage_removed(base, new, axis=-1):
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - np.mean(new, axis=axis) / np.mean(base, axis=axis)


def _mean_difference(a, b, axis=-1):
    return np.mean(b, axis=axis) - np.mean(a, axis=axis)


def ppl_ratio(nll_a, nll_b, **kwargs) -> Interval:
    """PPL_b / PPL_a from per-window mean NLLs (1 = no change; < 1: b is better)."""
    return paired_bootstrap(_ppl_ratio, nll_a, nll_b, **kwargs)


def gap_closed(nll_ref, nll_base, nll_new, **kwargs) -> Interval:
    """Share of base's PPL gap to the reference closed by new (0 = none, 1 = all of it)."""
    return paired_bootstrap(_gap_closed, nll_ref, nll_base, nll_new, **kwargs)


def damage_removed(kl_base, kl_new, **kwargs) -> Interval:
    """Share of base's mean KL(FP16 || quantized) that new removes (0 = none, 1 = all of it)."""
    return paired_bootstrap(_damage_removed, kl_base, kl_new, **kwargs)


def mean_difference(a, b, **kwargs) -> Interval:
    """mean(b) - mean(a), e.g. the accuracy difference over the same questions."""
    return paired_bootstrap(_mean_difference, a, b, **kwargs)
