"""DynamicSwitcher: DynaMo's online switch (spec Step 3, DQS), at channel level.

The expert-level widths of the baseline quantization (BQ) are fixed once, offline. A switch
changes only the cached dynamic channels (the ~1% of each expert's channels that carry the
cross-dataset change, dynamo.switching.cache): static channels are never touched, nothing is
re-quantized as a whole and nothing is reloaded.

`switch_to(windows)`:
1. profile: a routed capture of the new sample -> its per-layer expert shares (paper Eq. 1),
   with the same channel metric and unit as the known datasets' Significance. The sample runs
   through the model as it is (quantized); shares are normalised per layer, so they compare
   with the known ones measured on the FP16 model;
2. re-allocate: per layer, shares = (1 - mix) * fused known shares + mix * new shares (fused
   with the configured fusion, Eq. 2), then the same rule as BQ (`budget`: same target_bits and
   the FP16 error table kept in the cache; `fcm`: same parameters) -> one width per expert;
3. rewrite, for every expert whose width changed, its cached channels, by `channel_mode`:
   - requant: RTN at the new width from the FP16 cache. Row slices only: groups run along input
     columns, so a row is quantized on its own exactly as inside its matrix; a neuron's down
     COLUMN would share its groups with static columns, so neuron + requant is refused.
   - fp16: experts now wider than their BQ width get their cached channels back in FP16 from the
     cache; the others get the values BQ gave those channels. We keep a copy of those BQ values
     (`bq_copy_nbytes`, the size of the cache at the model's dtype; packed codes in a real
     deployment) instead of re-running RTN: identical for an RTN BQ, keeps GPTQ's values for a
     GPTQ BQ, and the only exact way back for a neuron's down column.
   In requant mode the construction itself rewrites every cached channel as RTN at its expert's
   BQ width from the cache (what an RTN apply_plan gave it, up to the FP16 rounding of the
   cache), so the BQ state is a function of plan and cache and `restore_bq` reproduces it bit
   for bit.

Atomic: the windows and the cache are checked first, the new values of every slice to change
are computed before any is written, and if writing fails the slices are put back, so a failed
switch leaves the model's outputs bit-identical.

Two average widths are reported: `expert_bits`, the expert-level code width the allocation
chose (per-weight average of each expert's width), and `exact_bits`, what the model holds:
static channels at their BQ width, cached channels at their active width (16 for FP16 ones).
Both count codes only (no group scales), over routed-expert weights.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ..adapters import PROJECTIONS, moe_layers
from ..analysis.significance import Significance, statistics_for
from ..calibration import capture
from ..errors import UserError
from ..quant.allocation import LayerInput, layer_widths, rule_of
from ..quant.fusion import fuse
from ..quant.plan import QuantPlan
from ..quant.rtn import quantize_rtn
from ..quant.spec import QSpec
from ..registry import ALLOCATIONS
from .base import Switcher, SwitchSummary
from .cache import ChannelCache
from .store import ChannelStore, DenseChannelStore, Key

CHANNEL_MODES = ("requant", "fp16")
FLOAT_BITS = 16


def _name(x) -> str:
    """An enum member of a structured config, or its plain string."""
    return getattr(x, "value", x)


def check_token_windows(windows, vocab: int) -> torch.Tensor:
    """A non-empty [N, T] tensor of integer ids inside the vocabulary, or one clear UserError."""
    if not isinstance(windows, torch.Tensor):
        raise UserError(f"switch_to needs a tensor of token ids, got {type(windows).__name__}")
    if windows.dim() != 2 or windows.numel() == 0:
        raise UserError(f"switch_to needs a non-empty [windows, seqlen] tensor of token ids, "
                        f"got shape {tuple(windows.shape)}")
    if windows.is_floating_point() or windows.is_complex() or windows.dtype == torch.bool:
        raise UserError(f"switch_to needs integer token ids, got dtype {windows.dtype}")
    low, high = int(windows.min()), int(windows.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise UserError(f"token id {bad} is outside the model's vocabulary [0, {vocab})")
    return windows.long()


def _write(store: ChannelStore, key: Key, values: torch.Tensor) -> None:
    """One slice into the model. A module-level seam so tests can make writing fail half-way."""
    store.write(key, values)


@dataclass
class SwitchReport:
    changed: list[tuple[int, int, int, int]]     # (layer, expert, old width, new width)
    slices_rewritten: int                        # cached rows/columns written into the model
    weights_rewritten: int                       # weight values written
    bytes_read: int                              # from the cache (and the BQ copy, fp16 mode)
    bytes_written: int                           # into the model's weights
    profile_s: float                             # input checks, the routed capture, the new shares
    allocate_s: float
    requant_s: float                             # computing the new slices and writing them
    widths: dict[int, list[int]]                 # layer -> active width of each expert
    expert_bits: float                           # expert-level average code width
    exact_bits: float                            # static at BQ width, cached at their active width
    shares: dict[int, list[float]] = field(default_factory=dict)  # layer -> the mixed shares allocated on

    @property
    def experts_changed(self) -> int:
        return len(self.changed)

    @property
    def bytes_moved(self) -> int:
        return self.bytes_read + self.bytes_written

    @property
    def total_s(self) -> float:
        return self.profile_s + self.allocate_s + self.requant_s

    def to_dict(self) -> dict:
        out = asdict(self)
        out["widths"] = {str(i): w for i, w in self.widths.items()}
        out["shares"] = {str(i): s for i, s in self.shares.items()}
        out.update(experts_changed=self.experts_changed, bytes_moved=self.bytes_moved, total_s=self.total_s)
        return out


class DynamicSwitcher(Switcher):
    """Holds a BQ-quantized model and switches its cached channels to the data it is given."""

    def __init__(self, model, plan: QuantPlan, significance: Significance, cache: ChannelCache, allocation, *,
                 channel_mode: str = "requant", mix: float = 0.5, batch_size: int = 8,
                 store: ChannelStore | None = None):
        """`model` already holds BQ (apply_plan with `plan`); `significance` is the known datasets';
        `cache` was built from the FP16 model; `allocation` is the quant.allocation node BQ used.
        `store`: where the cached channels live (default: the model's dense weights; a packed model
        passes `dynamo.packed.switching.PackedChannelStore`)."""
        if channel_mode not in CHANNEL_MODES:
            raise ValueError(f"unknown switching.channel_mode '{channel_mode}'; choose one of {', '.join(CHANNEL_MODES)}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"switching.mix must be in [0, 1], got {mix}")
        if cache is None:
            raise UserError("the switcher needs the FP16 channel cache built before quantization")
        if channel_mode == "requant" and cache.unit == "neuron":
            raise ValueError("channel_mode=requant needs the row unit: a neuron's down column shares its quantization "
                             "groups with static columns; use channel_mode=fp16 or analysis.channel_unit=row")
        if cache.unit != significance.unit:
            raise UserError(f"the cache holds '{cache.unit}' channels, the significance is per '{significance.unit}'")
        self.model, self.plan, self.significance, self.cache = model, plan, significance, cache
        self.store = store if store is not None else DenseChannelStore(model, cache)
        self.channel_mode, self.mix, self.batch_size = channel_mode, float(mix), batch_size
        self.method, self.fusion = _name(allocation.method), _name(allocation.fuse)
        self.widths = [int(w) for w in allocation.widths]
        self.allocation = allocation
        self.rule = rule_of(allocation)
        self.params = ALLOCATIONS.params_of(allocation)  # the rule's own settings, as BQ's allocation had them
        self._check_setup()
        self.layers = {layer.index: layer for layer in moe_layers(model)}
        self.bq: dict[Key, int] = {(i, e, p): plan.spec_for(i, e, p).bits
                                   for i, layer in self.layers.items() for e in range(layer.n_experts) for p in PROJECTIONS}
        self.active = dict(self.bq)
        self.fused = {i: fuse(significance.expert_matrix(i), self.fusion)[0] for i in self.layers}
        self.vocab = model.get_input_embeddings().num_embeddings
        # fp16 mode: the BQ values of the cached channels, the way back for experts that drop to BQ width
        self._bq_values = ({k: self.store.read(k) for k in self.bq}
                           if channel_mode == "fp16" else {})
        if channel_mode == "requant":  # the BQ state from the cache, so restore_bq is exact
            self._commit({k: self._target(k, w) for k, w in self.bq.items()})

    # --- setup checks ----------------------------------------------------------------------

    def _check_setup(self) -> None:
        if self.rule.needs != "significance":
            dynamo_rules = [n for n in ALLOCATIONS.names if ALLOCATIONS.get(n).needs == "significance"]
            raise UserError(f"switching re-runs DynaMo's allocation: quant.allocation.method must be one of "
                            f"{', '.join(dynamo_rules)} (rules that need significance), got '{self.method}'")
        if self.rule.check is not None:
            self.rule.check(self.allocation)
        if self.rule.error_table:
            default = self.plan.default
            if not self.cache.rtn_error:
                raise UserError(f"{self.method} switching needs the cache's FP16 error table: build the cache with "
                                "widths=quant.allocation.widths")
            if list(self.cache.widths) != self.widths or self.cache.group_size != default.group_size \
                    or self.cache.sym != default.sym:
                raise UserError(f"the cache's error table is for widths {self.cache.widths} (group "
                                f"{self.cache.group_size}, sym {self.cache.sym}); the allocation uses {self.widths} "
                                f"(group {default.group_size}, sym {default.sym})")
        self.store.validate()
        if self.cache.layers != self.significance.layers:
            raise UserError(f"the cache covers layers {self.cache.layers}, the significance {self.significance.layers}")
        layers = {layer.index: layer for layer in moe_layers(self.model)}
        self.plan.validate_against({i: layer.n_experts for i, layer in layers.items()},
                                   {i for i, layer in layers.items() if layer.shared_expert is not None})

    # --- the switch ------------------------------------------------------------------------

    def switch_to(self, windows: torch.Tensor) -> SwitchReport:
        """Profile `windows` [N, T], re-allocate, rewrite the cached channels of experts that changed."""
        t0 = time.perf_counter()
        windows = check_token_windows(windows, self.vocab)
        self.store.validate()
        stats = capture(self.model, windows, batch_size=self.batch_size, hessians=False,
                        expert_outputs=self.store.expert_outputs, statistics=statistics_for(self.significance.metric))
        new = Significance.from_captures({"new": stats}, list(self.layers.values()), self.significance.metric,
                                         self.significance.unit).expert("new")
        t1 = time.perf_counter()
        widths, shares = self.allocate(new)
        t2 = time.perf_counter()
        return self._switch(widths, shares, profile_s=t1 - t0, allocate_s=t2 - t1)

    def allocate(self, new_shares: dict[int, torch.Tensor]) -> tuple[dict[int, list[int]], dict[int, torch.Tensor]]:
        """Per layer, the BQ rule on (1 - mix) * fused known shares + mix * the new sample's shares."""
        widths, mixed_by_layer = {}, {}
        for i, layer in self.layers.items():
            new = new_shares[i].double()
            if new.shape != self.fused[i].shape:
                raise UserError(f"layer {i}: {new.numel()} new shares for {layer.n_experts} experts")
            mixed = (1.0 - self.mix) * self.fused[i] + self.mix * new
            given = LayerInput(i, layer.n_experts, shares=mixed, errors=self.cache.rtn_error.get(i), params=self.params)
            widths[i] = layer_widths(self.rule, given, self.allocation)
            mixed_by_layer[i] = mixed
        return widths, mixed_by_layer

    def apply_widths(self, widths: dict[int, list[int]]) -> SwitchReport:
        """Make `widths` (layer -> one width per expert) active, without profiling or allocating."""
        for i, layer in self.layers.items():
            if i not in widths or len(widths[i]) != layer.n_experts:
                raise UserError(f"widths must give each of the {layer.n_experts} experts of every MoE layer "
                                f"{sorted(self.layers)} a width; layer {i} has {widths.get(i)}")
            for w in widths[i]:
                QSpec(int(w))  # a supported width, or a clear ValueError
        return self._switch(widths, {}, profile_s=0.0, allocate_s=0.0)

    def switch_for(self, name: str, windows: torch.Tensor) -> SwitchReport:
        """The switch protocol's per-dataset entry: this switch always profiles `windows`."""
        return self.switch_to(windows)

    def remember(self, name: str) -> None:
        """The switch protocol's hook for keeping a dataset's state (the adaptive policy's slot sets): the
        paper's switch keeps nothing per dataset (its cache is fixed)."""

    def restore_bq(self) -> SwitchReport:
        """Back to the baseline: every expert at its BQ width, its cached channels as at construction."""
        return self._apply(dict(self.bq), {}, profile_s=0.0, allocate_s=0.0)

    def _switch(self, widths: dict[int, list[int]], shares: dict, profile_s: float, allocate_s: float) -> SwitchReport:
        target = {(i, e, p): int(widths[i][e]) for i, layer in self.layers.items()
                  for e in range(layer.n_experts) for p in PROJECTIONS}
        return self._apply(target, shares, profile_s, allocate_s)

    def _apply(self, target: dict[Key, int], shares: dict, profile_s: float, allocate_s: float) -> SwitchReport:
        t = time.perf_counter()
        to_write = [k for k, w in target.items() if self._state(k, w) != self._state(k, self.active[k])]
        new_values = {k: self._target(k, target[k]) for k in to_write}   # all computed before any write
        self._commit(new_values)
        requant_s = time.perf_counter() - t
        changed = sorted({(i, e, self._expert_width(self.active, i, e), self._expert_width(target, i, e))
                          for (i, e, p), w in target.items() if w != self.active[(i, e, p)]})
        bytes_read = sum(self._source_nbytes(k, target[k]) for k in to_write)
        written = sum(v.numel() for v in new_values.values())
        element = self.store.element_size()
        self.active = dict(target)
        return SwitchReport(
            changed=changed, slices_rewritten=sum(v.shape[0] for v in new_values.values()), weights_rewritten=written,
            bytes_read=bytes_read, bytes_written=written * element, profile_s=profile_s, allocate_s=allocate_s,
            requant_s=requant_s, widths=self.active_widths(), **self.average_bits(),
            shares={i: [round(float(x), 6) for x in s] for i, s in shares.items()})

    # --- slice states and values -----------------------------------------------------------

    def _state(self, key: Key, width: int) -> int:
        """The bits the cached channels of `key` are held at when their expert has `width`."""
        if self.channel_mode == "requant":
            return width
        return FLOAT_BITS if width > self.bq[key] else self.bq[key]

    def _target(self, key: Key, width: int) -> torch.Tensor:
        """The values [k, length] the cached channels of `key` get at expert width `width`."""
        i, e, p = key
        state = self._state(key, width)
        if self.channel_mode == "fp16" and state != FLOAT_BITS:
            return self._bq_values[key]
        fp16 = self.cache.cached(i, e, p)
        if state == FLOAT_BITS:
            return fp16
        spec = QSpec(state, self.plan.default.group_size, self.plan.default.sym)
        device = self.store.device(key)  # the cache lives in host memory; quantize where the weights are
        return quantize_rtn(fp16.to(device).float(), spec).dequantize()

    def _source_nbytes(self, key: Key, width: int) -> int:
        """Bytes a rewrite of `key` reads: its cached values and indices, or its BQ copy."""
        i, e, p = key
        if self.channel_mode == "fp16" and self._state(key, width) != FLOAT_BITS:
            v = self._bq_values[key]
            return v.numel() * v.element_size()
        v = self.cache.cached(i, e, p)
        index, _ = self.cache.slice_of(i, e, p)
        return v.numel() * v.element_size() + index.numel() * 4  # indices are stored as int32

    def _commit(self, new_values: dict[Key, torch.Tensor]) -> None:
        """Write every slice, or none: on any failure the previous values are put back."""
        previous = {k: self.store.read(k) for k in new_values}
        try:
            for key, values in new_values.items():
                _write(self.store, key, values)
        except BaseException:
            for key, values in previous.items():
                self.store.write(key, values)
            raise

    # --- accounting ------------------------------------------------------------------------

    def summary(self) -> SwitchSummary:
        resident = self.cache.nbytes + self.bq_copy_nbytes
        return SwitchSummary("paper", self.channel_mode, resident, "channel cache + BQ copy",
                             extra={"channel_mode": self.channel_mode, "mix": self.mix, "cache": self.cache.summary(),
                                    "bq_copy_nbytes": self.bq_copy_nbytes, "artifact": "channel_cache"})

    @staticmethod
    def _expert_width(widths: dict[Key, int], layer: int, expert: int) -> int:
        """An expert's width (its projections share one; the widest if a hand-made plan splits them)."""
        return max(widths[(layer, expert, p)] for p in PROJECTIONS)

    def active_widths(self) -> dict[int, list[int]]:
        return {i: [self._expert_width(self.active, i, e) for e in range(layer.n_experts)]
                for i, layer in self.layers.items()}

    @property
    def bq_copy_nbytes(self) -> int:
        """fp16 mode: the BQ values of the cached channels kept for the way back (0 in requant mode)."""
        return sum(v.numel() * v.element_size() for v in self._bq_values.values())

    def average_bits(self) -> dict:
        """expert_bits: the allocation's per-weight average width; exact_bits: what the model holds."""
        total = expert = exact = 0
        for (i, e, p), width in self.active.items():
            out, inp = self.cache.shapes[i][p]
            n, cached = out * inp, self.cache.cached_count(i, p)
            total += n
            expert += width * n
            exact += self.bq[(i, e, p)] * (n - cached) + self._state((i, e, p), width) * cached
        return {"expert_bits": expert / total, "exact_bits": exact / total}

