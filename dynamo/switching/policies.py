"""The DQS policies (`quant.switching.policy`), registered in dynamo.registry.SWITCH_POLICIES.

A policy has a check and two steps, each given the config nodes it reads (quant, analysis): `check`
refuses settings it cannot use before any model work (UserError, one line); `prepare` runs on
the FP16 model before it is quantized (what a switch will restore from: the paper's channel cache,
or our FP16 master copy) and `build` makes the switcher once BQ is in the model. A switcher offers `switch_to(windows)` (a report with
`to_dict()`, `experts_changed`, `total_s`, `profile_s`, `exact_bits`), `restore_bq()`, the
`switched(...)` / `restored()` contexts, and `summary()`: a dynamo.switching.base.SwitchSummary (the
record's `switching` block), the same fields for every policy (dynamo/switching/base.py).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..registry import ALLOCATIONS, register_policy


@register_policy("adaptive")
class AdaptivePolicy:
    """Ours: slots chosen per dataset from its calib split, restored from an FP16 master copy."""

    name = "adaptive"

    @staticmethod
    def check(quant, analysis) -> None:
        sw = quant.switching
        if not 0.0 < sw.budget_frac < 1.0:
            raise UserError(f"quant.switching.budget_frac must be in (0, 1) (a share of the routed experts' FP16 "
                            f"bytes), got {sw.budget_frac}")
        if quant.export.value == "packed" and sw.candidates.value in ("experts8", "all"):
            raise UserError(f"quant.switching.candidates={sw.candidates.value} raises whole experts to 8 bits, which a "
                            "packed export's slot tables cannot hold; use candidates=rows_cols_lowrank (or lowrank)")

    @staticmethod
    def prepare(model, quant, analysis, significance, run_dir: Path):
        from .master import DiskMaster, ExpertMaster

        if quant.switching.master.value == "disk":  # the checkpoint the model was loaded from
            return DiskMaster(getattr(model, "name_or_path", "") or model.config._name_or_path, model)
        return ExpertMaster(model)

    @staticmethod
    def quantize_errors(prepared):
        return None

    @staticmethod
    def build(model, plan, significance, prepared, quant, analysis):
        from .adaptive import AdaptiveSwitcher

        sw = quant.switching
        return AdaptiveSwitcher(model, plan, prepared, budget_frac=sw.budget_frac, candidates=sw.candidates.value,
                                scoring=sw.scoring.value, slot_bits=sw.slot_bits, batch_size=analysis.batch_size)


@register_policy("paper")
class PaperPolicy:
    """The paper's DQS: the FP16 cache of each expert's dynamic channels (fixed offline from the known
    datasets), re-allocated on the new dataset's shares (`mix`), rewritten for the experts that changed."""

    name = "paper"

    @staticmethod
    def check(quant, analysis) -> None:
        sw = quant.switching
        if sw.channel_mode.value == "requant" and analysis.channel_unit.value == "neuron":
            raise UserError("quant.switching.channel_mode=requant needs analysis.channel_unit=row (a neuron's down "
                            "column shares its quantization groups); use channel_mode=fp16")
        if not 0.0 <= sw.mix <= 1.0:
            raise UserError(f"quant.switching.mix must be in [0, 1], got {sw.mix}")

    @staticmethod
    def prepare(model, quant, analysis, significance, run_dir: Path):
        from .cache import ChannelCache

        alloc = quant.allocation
        cache = ChannelCache.build(model, significance, analysis.dynamic_channel_frac,
                                   widths=list(alloc.widths) if ALLOCATIONS.get(alloc.method).error_table else [],
                                   group_size=quant.group_size, sym=quant.sym)
        cache.save(run_dir / "channel_cache")
        return cache

    @staticmethod
    def quantize_errors(prepared):
        return prepared.rtn_error  # the budget allocation's error table, measured once by the cache

    @staticmethod
    def build(model, plan, significance, prepared, quant, analysis):
        from .switch import DynamicSwitcher

        sw = quant.switching
        return DynamicSwitcher(model, plan, significance, prepared, quant.allocation,
                               channel_mode=sw.channel_mode.value, mix=sw.mix, batch_size=analysis.batch_size)
