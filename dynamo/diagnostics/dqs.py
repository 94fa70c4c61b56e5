"""The DQS bench: one BQ model, every domain's windows, the FP16 reference, and paired comparisons against BQ.

Shared by scripts/dqs_fidelity.py and scripts/dqs_compare.py. `Bench` builds, once per process:
- the harness's BQ (`quant=<quant>`: analysis on the known domains, GPTQ, budget allocation), with what a switch
  restores from: the FP16 master of the routed experts (adaptive) and the paper's channel cache;
- per domain, windows of the domain's own splits: `profile` (the first `quant.switching.sample_windows` calib
  windows: what a switch sees, as run.py does), `calib` (held-out calib windows, evenly spaced over the rest: design
  choices are made HERE, never on test), `test` (evenly spaced over the test split: the reported numbers) and
  `fit` (the calib windows not held out, for the full GPTQ re-quantization that is the ceiling);
- the FP16 model's next-token log-probs of every calib and test window (dynamo.eval.fidelity, on disk).
Every variant is measured the same way (`compare`): the share of BQ's mean token KL(FP16 || quantized) removed
(`dynamo.stats.damage_removed`, 95% paired BCa bootstrap over windows), PPL / BQ (`stats.ppl_ratio`) and top-1
agreement; after each variant the whole model is restored to BQ and checked bit for bit (`state_digest`).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from .. import stats
from ..adapters import PROJECTIONS, moe_layers
from ..config import CONF_DIR, register_hydra
from ..data import load_documents, sources_of
from ..errors import UserError
from ..eval.fidelity import ReferenceLogprobs
from ..eval.perplexity import make_windows, token_perplexity, tokenize_corpus
from ..models import load_model
from ..pipeline import run_analysis
from ..quant.apply import GPTQOptions
from ..quant.stage import quantize
from ..registry import QUANTIZERS
from ..switching.adaptive import AdaptiveSwitcher
from ..switching.policies import AdaptivePolicy, PaperPolicy
from ..tokens import RunTokens, bos_id_for
from .routed import routed_error

SPLITS = ("calib", "test")
EVAL_BATCH = 8


@dataclass
class DomainWindows:
    profile: torch.Tensor   # what a switch profiles
    calib: torch.Tensor     # held-out calib windows: the design choice
    test: torch.Tensor      # the reported numbers
    fit: torch.Tensor       # calib windows not held out: the GPTQ ceiling's calibration


def spaced(n_total: int, n: int | None) -> torch.Tensor:
    """`n` indices evenly spaced over range(n_total) (all of them for n None or 0)."""
    if not n or n >= n_total:
        return torch.arange(n_total)
    return torch.linspace(0, n_total - 1, n).round().long()


def split_windows(calib: torch.Tensor, test: torch.Tensor, *, sample: int, calib_eval: int, test_windows: int | None,
                  fit_windows: int) -> DomainWindows:
    """The four window sets of one domain from its calib and test windows (see the module doc)."""
    held = sample + spaced(len(calib) - sample, calib_eval)
    rest = torch.ones(len(calib), dtype=torch.bool)
    rest[held] = False
    return DomainWindows(profile=calib[:sample], calib=calib[held], test=test[spaced(len(test), test_windows)],
                         fit=calib[rest][:fit_windows])


def state_digest(model) -> str:
    """sha256 of every tensor of the state dict, in order (a restore is checked bit for bit with it)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def compare(base: dict, new: dict) -> dict:
    """A variant against BQ over the same windows (both from `Bench.evaluate`)."""
    removed = stats.damage_removed(base["kl"], new["kl"])
    ratio = stats.ppl_ratio(base["nll"], new["nll"])
    return {"damage_removed": removed.to_dict(), "ppl_ratio_to_bq": ratio.to_dict(), "ppl": new["ppl"],
            "kl": float(np.mean(new["kl"])), "top1_agree": float(np.mean(new["top1"]))}


def significant(interval: dict, value: float = 0.0) -> bool:
    """The interval (an Interval.to_dict()) lies wholly on one side of `value`."""
    return interval["low"] > value or interval["high"] < value


def fmt(iv: dict, pct: bool = True) -> str:
    f = (lambda x: f"{100 * x:+.1f}%") if pct else (lambda x: f"{x:.4f}")
    return f"{f(iv['estimate'])} [{f(iv['low'])}, {f(iv['high'])}]"


# --quick: a smoke test of the whole protocol in seconds (a few short windows everywhere), never a result
QUICK = {"calib_eval_windows": 2, "test_windows": 2,
         "overrides": ("calib.windows=2", "analysis.windows=2", "quant.switching.sample_windows=2", "eval.seqlen=128",
                       "analysis.seqlen=128", "calib.seqlen=128")}
FULL = {"calib_eval_windows": 8, "test_windows": 30}

SWITCH_KEYS = ("total_s", "profile_s", "experts_changed", "exact_bits", "extra_nbytes", "slots", "expected_reduction",
               "bytes_moved")


class Bench:
    """The BQ model and everything measured against it; a context manager (the reference and run folder are
    temporary). `policy` specs are data: {"policy": "paper"} or {"policy": "adaptive", <AdaptiveSwitcher kwargs>}."""

    def __init__(self, model: str, quant: str = "dynamo_3bit", domains: list[str] | None = None, *,
                 novel_only: bool = False, calib_eval_windows: int = 8, test_windows: int | None = 30,
                 overrides: tuple[str, ...] = ()):
        register_hydra()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            self.cfg = compose("config", overrides=[f"model={model}", f"quant={quant}", "eval=ppl", "logger=none",
                                                    *overrides])
        self.known = list(self.cfg.dataset.known)
        self.sources = sources_of(self.cfg.dataset)
        unknown = [d for d in domains or () if d not in self.sources]
        if unknown:
            raise UserError(f"unknown domain(s) {unknown}; the dataset suite has {sorted(self.sources)}")
        self.domains = [d for d in (domains or self.sources) if not (novel_only and d in self.known)]
        self.novel = [d for d in self.domains if d not in self.known]
        self.calib_eval_windows, self.test_windows = calib_eval_windows, test_windows
        self._bq: dict[str, dict] = {}

    # --- building -----------------------------------------------------------------------------

    def __enter__(self) -> Bench:
        cfg = self.cfg
        self.started = time.perf_counter()
        self.reference = ReferenceLogprobs()
        self._tmp = tempfile.TemporaryDirectory()
        tmp = Path(self._tmp.name)
        torch.manual_seed(cfg.seed)
        self.loaded = load_model(cfg.model)
        self.model, tokenizer = self.loaded.model, self.loaded.tokenizer
        self.bos_id = bos_id_for(cfg.model, tokenizer)  # windows as the model was trained (model.bos_windows)
        self.windows = {d: self._windows(tokenizer, d) for d in self.domains}
        self.fp16 = {(d, s): self.evaluate(d, s, record=True) for d in self.domains for s in SPLITS}
        # whole copies of the model (FP16 and BQ): the ceiling re-quantizes from FP16 and puts BQ back; the bench is
        # for the embedded models (tens of MB), not real-width ones
        self.fp16_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        tokens = RunTokens(tokenizer, self.sources, self.bos_id)
        self.significance, _, _ = run_analysis(self.loaded, tokens, cfg, tmp)
        self.master = AdaptivePolicy.prepare(self.model, cfg.quant, cfg.analysis, self.significance, tmp)
        self.cache = PaperPolicy.prepare(self.model, cfg.quant, cfg.analysis, self.significance, tmp)
        self.result = quantize(self.model, tokens, self.known, cfg.quant, cfg.calib, cfg.model.name,
                               significance=self.significance, errors=self.cache.rtn_error)
        self.plan = self.result.plan
        self.bq_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.bq_experts = {(layer.index, e, p): layer.weight(e, p).detach().clone() for layer in moe_layers(self.model)
                           for e in range(layer.n_experts) for p in PROJECTIONS}
        self.bq_digest = state_digest(self.model)
        return self

    def __exit__(self, *exc) -> None:
        self.reference.close()
        self._tmp.cleanup()

    def _windows(self, tokenizer, d: str) -> DomainWindows:
        src, cfg = self.sources[d], self.cfg
        ids = {s: tokenize_corpus(tokenizer, load_documents(src, s), src.separator) for s in SPLITS}
        calib = make_windows(ids["calib"], cfg.analysis.seqlen, None, d, bos_id=self.bos_id)
        test = make_windows(ids["test"], cfg.eval.seqlen, None, d, bos_id=self.bos_id)
        return split_windows(calib, test, sample=cfg.quant.switching.sample_windows,
                             calib_eval=self.calib_eval_windows, test_windows=self.test_windows,
                             fit_windows=cfg.calib.windows)

    # --- measuring ----------------------------------------------------------------------------

    def evaluate(self, d: str, split: str, record: bool = False) -> dict:
        """One pass over a domain's split: per-window NLL, and KL / top-1 to the FP16 reference (record: write it)."""
        windows, key = getattr(self.windows[d], split), f"{d}/{split}"
        if record:
            vocab = self.model.get_output_embeddings().out_features
            callback, fid = self.reference.recorder(key, windows, vocab), None
        else:
            callback, fid = self.reference.comparer(key, windows)
        result = token_perplexity(self.model, windows, batch_size=EVAL_BATCH, on_logprobs=callback)
        out = {"nll": result.window_nll, "ppl": result.ppl}
        if fid is not None:
            out.update(kl=fid.kl, top1=fid.top1)
        return out

    def bq(self, d: str) -> dict:
        """BQ's evaluation of both splits of a domain (once per domain)."""
        if d not in self._bq:
            self._bq[d] = {s: self.evaluate(d, s) for s in SPLITS}
        return self._bq[d]

    def bq_row(self, d: str) -> dict:
        return {s: {"ppl": e["ppl"], "kl": float(np.mean(e["kl"])), "top1_agree": float(np.mean(e["top1"])),
                    "windows": len(e["kl"]), "ppl_fp16": self.fp16[(d, s)]["ppl"]} for s, e in self.bq(d).items()}

    def realized(self, d: str) -> dict:
        """The routed experts' output error removed against BQ, on the held-out calib windows (routed.py)."""
        err = routed_error(self.model, self.windows[d].calib, self.master.get, self.bq_experts.__getitem__,
                           batch_size=self.cfg.analysis.batch_size)
        return err.to_dict()

    def switcher(self, spec: dict, budget_frac: float | None = None):
        """The switcher a policy spec names; adaptive kwargs not in the spec come from quant.switching.
        An adaptive setting the switcher does not know raises its UserError."""
        cfg, spec = self.cfg, dict(spec)
        policy = spec.pop("policy")
        if policy == "paper":
            return PaperPolicy.build(self.model, self.plan, self.significance, self.cache, cfg.quant, cfg.analysis)
        # built here, not by AdaptivePolicy.build: a spec may name a candidate kind the config schema does not list
        # yet, and then the switcher's own check (a UserError) is what the caller reports
        sw = cfg.quant.switching
        kwargs = {"budget_frac": sw.budget_frac if budget_frac is None else budget_frac,
                  "candidates": sw.candidates.value, "scoring": sw.scoring.value, "slot_bits": sw.slot_bits,
                  "batch_size": cfg.analysis.batch_size, **spec}
        return AdaptiveSwitcher(self.model, self.plan, self.master, **kwargs)

    def measure_switch(self, switcher, d: str, realized: bool = False) -> tuple[dict, dict]:
        """Switch to the domain's profile windows, compare both splits with BQ, restore BQ (checked).
        Returns (the row, {split: per-window KL})."""
        report = switcher.switch_to(self.windows[d].profile)
        summary = report.to_dict()
        row = {"switch": {k: summary[k] for k in SWITCH_KEYS if k in summary}}
        if realized:
            row["realized"] = self.realized(d)
            expected = summary.get("expected_reduction")
            row["realized"]["over_expected"] = row["realized"]["removed"] / expected if expected else None
        kls = self._compare_splits(d, row)
        switcher.restore_bq()
        self.check_bq(f"the switch on {d}")
        return row, kls

    def gptq_ceiling(self, d: str, realized: bool = False) -> tuple[dict, dict]:
        """Every expert re-quantized from FP16 by the BQ method on the domain's own calib windows (`fit`), at BQ's
        bit allocation (its plan); compared with BQ like a switch, then BQ is put back (checked)."""
        cfg, fit = self.cfg, self.windows[d].fit
        self.model.load_state_dict(self.fp16_state)
        try:
            t = time.perf_counter()
            options = GPTQOptions(damp=cfg.quant.damp, act_order=cfg.quant.act_order)
            QUANTIZERS.get(self.plan.method).fn(self.model, self.plan, fit, cfg.calib, options, False)
            row = {"requant": {"method": self.plan.method, "windows": len(fit), "seconds": time.perf_counter() - t}}
            if realized:
                row["realized"] = self.realized(d)
            kls = self._compare_splits(d, row)
        finally:
            self.model.load_state_dict(self.bq_state)
        self.check_bq(f"the GPTQ ceiling on {d}")
        return row, kls

    def _compare_splits(self, d: str, row: dict) -> dict:
        kls = {}
        for s in SPLITS:
            new = self.evaluate(d, s)
            row[s] = compare(self.bq(d)[s], new)
            kls[s] = new["kl"]
        return kls

    def check_bq(self, what: str) -> None:
        if state_digest(self.model) != self.bq_digest:
            raise RuntimeError(f"{what} did not restore BQ bit for bit")

    @property
    def wall_s(self) -> float:
        return round(time.perf_counter() - self.started, 1)

    def protocol(self) -> dict:
        cfg = self.cfg
        return {"known": self.known, "novel": self.novel, "seqlen": cfg.eval.seqlen, "calib_seqlen": cfg.analysis.seqlen,
                "profile_windows": cfg.quant.switching.sample_windows, "calib_eval_windows": self.calib_eval_windows,
                "test_windows": {d: len(self.windows[d].test) for d in self.domains},
                "fit_windows": {d: len(self.windows[d].fit) for d in self.domains},
                "statistic": "damage removed = 1 - mean KL(new) / mean KL(BQ); 95% paired BCa bootstrap over windows",
                "data": "each domain's own calib and test splits (dataset=embedded sources)"}
