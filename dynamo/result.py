"""What a run produced, typed: each stage returns its part, `pipeline.run` returns a `RunResult`.

Nothing here writes or formats: `records.record_of` turns a RunResult into result.json and
`records.sample_files` into the per-window / per-question files beside it (results/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .eval.fidelity import WindowFidelity
    from .eval.harness import LmEvalResult


@dataclass
class PerplexityPass:
    """One token-perplexity pass over every evaluated dataset (dynamo.eval.perplexity)."""

    ppl: dict[str, float]
    protocol: dict[str, dict]                   # record["protocol"]["ppl"] of the run's own pass
    window_nll: dict[str, list[float]]          # mean loss of each window, for paired comparisons
    fidelity: dict[str, WindowFidelity] = field(default_factory=dict)  # with a reference: KL, top-1 per window
    seconds: float = 0.0

    def fidelity_metrics(self, suffix: str = "") -> dict:
        """metrics.kl<suffix> and metrics.top1_agree<suffix> per dataset ({} without a reference)."""
        if not self.fidelity:
            return {}
        return {f"kl{suffix}": {name: f.mean_kl for name, f in self.fidelity.items()},
                f"top1_agree{suffix}": {name: f.mean_top1 for name, f in self.fidelity.items()}}

    @property
    def window_kl(self) -> dict[str, list[float]] | None:
        return {name: f.kl for name, f in self.fidelity.items()} if self.fidelity else None


@dataclass
class Switching:
    """DQS over a run: the switch before each dataset's evaluation and the policy's summary."""

    switches: dict[str, dict]   # dataset -> the switch report (experts changed, seconds, exact bits, ...)
    summary: dict               # policy, budget, overheads (switcher.summary() and its prepare_s)

    def to_dict(self) -> dict:
        return {"switches": self.switches, **self.summary}


@dataclass
class Evaluation:
    """The perplexity stage after quantization: the run's pass, and with DQS BQ alone and the stream."""

    run: PerplexityPass
    bq: PerplexityPass | None = None
    switching: Switching | None = None
    stream: dict | None = None                  # eval.stream's report (dynamo.switching.run_stream)
    stream_s: float | None = None


@dataclass
class LmEval:
    result: LmEvalResult
    protocol: dict
    seconds: float


@dataclass
class RunResult:
    """Everything result.json and the files beside it hold."""

    run_id: str
    config: dict                                # the resolved config, JSON-ready
    overrides: list[str]
    created_at: str                             # records.provenance(): when, where, which code
    device: dict
    git: dict
    versions: dict
    model: dict                                 # name, path, class, model_type, params, dtype, max_length
    evaluation: Evaluation
    timings: dict[str, float]                   # seconds per stage, in the order the stages ran
    fp16: PerplexityPass | None = None          # eval.reference: the 16-bit model, before quantizing
    lm_eval: LmEval | None = None
    calibration: dict | None = None             # coverage of the calibration (report_coverage)
    analysis: dict | None = None                # DynaMo's analysis: captures, cache, share of the offline stage
    quantization: dict | None = None            # the plan's summary: method, allocation, bit accounting
    export: dict | None = None
    inputs: dict | None = None                  # {label: size:sha256} of each local input file (fingerprint.py)

    @property
    def avg_bits(self) -> dict | None:
        if self.quantization is None:
            return None
        bits = self.quantization["bits"]
        return {"experts": bits["experts"], "all": bits["all"], "experts_codes_only": bits["experts_codes_only"]}
