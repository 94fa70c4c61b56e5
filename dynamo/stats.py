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
- `mean_gap_closed(strata)`: the mean over domains of `gap_closed`, resampling the windows of each
  domain separately (a stratified paired bootstrap: domains differ in window count, so their
  windows do not pair across domains, only across runs).

The per-unit samples live beside each run's result.json (`SAMPLE_FILES`, `MC_CORRECT_FILE`);
`load_samples` / `load_mc_correct` read them and raise `MissingSamplesError` when a run predates
them, `compare_runs` pairs two runs dataset by dataset.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import stats as scipy_stats

from .records import MC_CORRECT_FILE, WINDOW_FILES

CONFIDENCE = 0.95
N_RESAMPLES = 2000
SEED = 0

SAMPLE_FILES = WINDOW_FILES  # the per-unit files beside result.json, by the metrics key they belong to


class PairingError(ValueError):
    """The samples do not pair up (different lengths, or too few units to resample)."""


class MissingSamplesError(FileNotFoundError):
    """A run folder lacks the per-unit file a paired comparison needs (the run predates it)."""


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
    return _bootstrap(statistic, arrays, True, len(arrays[0]), confidence, n_resamples, seed)


def stratified_bootstrap(statistic: Callable[..., np.ndarray], strata: Sequence[Sequence], *,
                         confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Interval:
    """CI of `statistic(*stacked, axis=-1)` where stratum i is `stacked[i]`, its paired samples stacked
    to shape (k, n_i): the units of each stratum are resampled together (paired across its k samples),
    strata independently of each other. `statistic` reads sample j of a stratum as `stacked[i][j]`."""
    if not strata:
        raise PairingError("a stratified bootstrap needs at least one stratum")
    stacked = [np.stack(_as_paired(tuple(stratum))) for stratum in strata]
    return _bootstrap(statistic, stacked, False, sum(s.shape[-1] for s in stacked), confidence, n_resamples, seed)


def _bootstrap(statistic, arrays, paired: bool, n: int, confidence: float, n_resamples: int, seed: int) -> Interval:
    estimate = float(statistic(*arrays, axis=-1))
    kwargs = dict(paired=paired, vectorized=True, axis=-1, confidence_level=confidence, n_resamples=n_resamples)
    method = "BCa"
    with warnings.catch_warnings():
        # BCa warns (and returns NaN) when the jackknife is degenerate, e.g. identical runs.
        warnings.simplefilter("ignore", category=scipy_stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", category=RuntimeWarning)
        result = scipy_stats.bootstrap(arrays, statistic, method="BCa", rng=np.random.default_rng(seed), **kwargs)
        low, high = result.confidence_interval
        if not (np.isfinite(low) and np.isfinite(high)):
            method = "percentile"
            result = scipy_stats.bootstrap(arrays, statistic, method="percentile", rng=np.random.default_rng(seed),
                                           **kwargs)
            low, high = result.confidence_interval
    if not (np.isfinite(low) and np.isfinite(high)):  # every resample identical: no spread at all
        low = high = estimate
    return Interval(estimate=estimate, low=float(low), high=float(high), confidence=confidence, n=n, method=method)


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


def _mean_gap_closed(*strata, axis=-1):
    return np.mean([_gap_closed(x[0], x[1], x[2], axis=axis) for x in strata], axis=0)


def mean_gap_closed(strata: Sequence[tuple], **kwargs) -> Interval:
    """Mean over domains of gap_closed; `strata` holds one (nll_ref, nll_base, nll_new) per domain."""
    return stratified_bootstrap(_mean_gap_closed, strata, **kwargs)


def load_samples(run_dir: Path, name: str) -> dict[str, np.ndarray]:
    """{dataset: per-unit values} from a run's `name` file (e.g. window_nll.json)."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise MissingSamplesError(f"{path} not found: the run predates per-window records or did not compute "
                                  "that pass; re-run its configuration to compare it pairwise")
    return {key: np.asarray(values, dtype=np.float64) for key, values in json.loads(path.read_text()).items()}


def compare_runs(run_a: Path, run_b: Path, file_a: str = SAMPLE_FILES["ppl"], file_b: str = SAMPLE_FILES["ppl"],
                 **kwargs) -> dict[str, Interval]:
    """PPL ratio B / A per dataset both runs evaluated, over their paired windows."""
    a, b = load_samples(run_a, file_a), load_samples(run_b, file_b)
    common = [name for name in a if name in b]
    if not common:
        raise PairingError(f"{run_a}/{file_a} and {run_b}/{file_b} share no dataset")
    return {name: ppl_ratio(a[name], b[name], **kwargs) for name in common}


def load_mc_correct(run_dir: Path) -> dict[str, dict[str, list]]:
    """Per-question correctness of the run's multiple-choice lm-eval tasks (MC_CORRECT_FILE)."""
    path = Path(run_dir) / MC_CORRECT_FILE
    if not path.is_file():
        raise MissingSamplesError(f"{path} not found: the record predates per-question results")
    return json.loads(path.read_text())


def accuracy_difference(a: dict[str, list], b: dict[str, list], metric: str = "acc", **kwargs) -> Interval:
    """metric(b) - metric(a) over the same questions; a and b are one task's entries of mc_correct.json."""
    if a.get("doc_id") != b.get("doc_id"):
        raise PairingError("the runs answered different questions (lm_eval limit or task data differ)")
    if metric not in a or metric not in b:
        raise PairingError(f"per-question '{metric}' not recorded")
    return mean_difference(a[metric], b[metric], **kwargs)
