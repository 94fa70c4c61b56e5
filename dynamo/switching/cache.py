"""ChannelCache: the FP16 copies of every expert's dynamic channels (spec Step 3, DQS).

Built from the FP16 model BEFORE quantization, from `Significance.dynamic_channels(frac)`
(the ~1% of each expert's channels whose significance moves most across datasets): for
every (layer, expert, projection), the indices of its dynamic channels and the FP16 values
of those weight slices. What a slice is depends on the significance unit:
- row:    an output row of gate, up or down (each projection has its own indices);
- neuron: neuron c is gate row c, up row c and down column c (one index set for all three).
Values are stored channel-major, [experts, k, length]: a down column is stored as a row of
length H, so every slice is read and written the same way whatever its axis.

`nbytes` counts exactly what an online switch reads: the values (2 bytes each in FP16) and the
int32 indices. The cache also keeps, when built with `widths`, the budget allocation's error
table (per expert and width, the relative RTN error of its FP16 weights, the one
dynamo.quant.budget computes): the switch re-runs the allocation on the quantized model, where
that table can no longer be measured. It is reported apart (`aux_nbytes`), not in `nbytes`.

Saved as path.safetensors + path.json (no pickles); `load(path, model)` refuses a cache whose
layers, expert counts or weight shapes do not match the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..adapters import PROJECTIONS, MoELayer, moe_layers
from ..errors import UserError
from ..quant.budget import error_table
from ..quant.spec import QSpec
from ..records import save_tensors_atomic, write_json_atomic

SCHEMA_VERSION = 1
INDEX_DTYPE = torch.int32
# projection -> (index set it uses, axis of its weight the indices select) for each unit
SLICES = {"row": {"gate": ("gate", 0), "up": ("up", 0), "down": ("down", 0)},
          "neuron": {"gate": ("neuron", 0), "up": ("neuron", 0), "down": ("neuron", 1)}}


def read_slice(weight: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
    """The selected rows (axis 0) or columns (axis 1) of an [out, in] weight, channel-major [k, length]."""
    return weight[index].clone() if axis == 0 else weight[:, index].T.clone()


def write_slice(weight: torch.Tensor, index: torch.Tensor, axis: int, values: torch.Tensor) -> None:
    """Inverse of read_slice, in place (weight is a view of the model's storage)."""
    if axis == 0:
        weight[index] = values.to(weight.dtype)
    else:
        weight[:, index] = values.T.to(weight.dtype)


@dataclass
class ChannelCache:
    unit: str                                        # "row" or "neuron" (the significance unit)
    frac: float                                      # dynamic_channel_frac it was built with
    index: dict[int, dict[str, torch.Tensor]]        # layer -> index set -> [E, k] int32
    values: dict[int, dict[str, torch.Tensor]]       # layer -> projection -> [E, k, length], FP16
    shapes: dict[int, dict[str, tuple[int, int]]]    # layer -> projection -> an expert's weight [out, in]
    n_experts: dict[int, int]
    widths: list[int] = field(default_factory=list)  # columns of rtn_error
    group_size: int = 128                            # the grid rtn_error was measured on
    sym: bool = False
    rtn_error: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [E, len(widths)] float64
    meta: dict = field(default_factory=dict)

    # --- building --------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def build(cls, model, significance, frac: float, *, dtype: torch.dtype = torch.float16,
              widths: list[int] | tuple[int, ...] = (), group_size: int = 128, sym: bool = False,
              meta: dict | None = None) -> "ChannelCache":
        """From the FP16 model, before it is quantized. `widths` (with group_size/sym): also the
        budget allocation's error table, needed by a switcher that allocates with `budget`."""
        if significance.unit not in SLICES:
            raise UserError(f"no channel cache for significance unit '{significance.unit}'; "
                            f"choose one of {', '.join(SLICES)}")
        layers = {layer.index: layer for layer in moe_layers(model)}
        if sorted(layers) != significance.layers:
            raise UserError(f"the significance covers MoE layers {significance.layers}, the model has {sorted(layers)}")
        specs = [QSpec(w, group_size, sym) for w in widths]
        dynamic = significance.dynamic_channels(frac)
        index, values, shapes, n_experts, errors = {}, {}, {}, {}, {}
        for i, layer in layers.items():
            index[i] = {name: t.to(INDEX_DTYPE).contiguous() for name, t in dynamic[i].items()}
            n_experts[i] = layer.n_experts
            shapes[i] = {p: tuple(layer.weight(0, p).shape) for p in PROJECTIONS}
            values[i] = {}
            for p in PROJECTIONS:
                name, axis = SLICES[significance.unit][p]
                values[i][p] = torch.stack([read_slice(layer.weight(e, p), index[i][name][e].long(), axis)
                                            for e in range(layer.n_experts)]).to(dtype).cpu()
            if specs:
                errors[i] = error_table(layer, specs)
        return cls(unit=significance.unit, frac=frac, index=index, values=values, shapes=shapes, n_experts=n_experts,
                   widths=list(widths), group_size=group_size, sym=sym, rtn_error=errors,
                   meta={"metric": significance.metric, "datasets": list(significance.datasets), **(meta or {})})

    # --- access ----------------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        return sorted(self.values)

    def slice_of(self, layer: int, expert: int, projection: str) -> tuple[torch.Tensor, int]:
        """(channel indices [k] as int64, axis) of one expert's cached slices in one projection."""
        name, axis = SLICES[self.unit][projection]
        return self.index[layer][name][expert].long(), axis

    def cached(self, layer: int, expert: int, projection: str) -> torch.Tensor:
        """The FP16 values [k, length] of one expert's dynamic channels in one projection."""
        return self.values[layer][projection][expert]

    def read(self, layer: MoELayer, expert: int, projection: str) -> torch.Tensor:
        """What the model holds now at those channels (a copy)."""
        weight = layer.weight(expert, projection)
        index, axis = self.slice_of(layer.index, expert, projection)
        return read_slice(weight, index.to(weight.device), axis)

    def write(self, layer: MoELayer, expert: int, projection: str, values: torch.Tensor) -> None:
        """Write [k, length] values into the model at those channels; nothing else is touched."""
        weight = layer.weight(expert, projection)
        index, axis = self.slice_of(layer.index, expert, projection)
        write_slice(weight, index.to(weight.device), axis, values.to(weight.device))

    def output_rows(self, model) -> dict[int, dict[str, torch.Tensor]]:
        """Per MoE layer and projection, the [experts, k] output rows it caches: what a packed model keeps at
        its dtype (dynamo.packed.model.ChannelSource). Row unit only: a neuron's down slice is a column."""
        if any(axis != 0 for _, axis in SLICES[self.unit].values()):
            raise UserError(f"a packed model keeps cached channels as output rows; this cache's unit is '{self.unit}' "
                            "(a neuron's down slice is a column). Build it with analysis.channel_unit=row")
        self.validate(model)
        return {i: {p: self.index[i][SLICES[self.unit][p][0]] for p in PROJECTIONS} for i in self.layers}

    def cached_count(self, layer: int, projection: str) -> int:
        """Cached weight values of one expert in one projection (k * slice length)."""
        t = self.values[layer][projection]
        return t.shape[1] * t.shape[2]

    # --- accounting ------------------------------------------------------------------------

    @property
    def value_count(self) -> int:
        return sum(t.numel() for per in self.values.values() for t in per.values())

    @property
    def index_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for per in self.index.values() for t in per.values())

    @property
    def nbytes(self) -> int:
        """Values (at their stored width) plus int32 indices: what the cache costs in memory."""
        return sum(t.numel() * t.element_size() for per in self.values.values() for t in per.values()) \
            + self.index_nbytes

    @property
    def aux_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.rtn_error.values())

    @property
    def expert_weight_count(self) -> int:
        """All routed-expert weight values of the model the cache was built for."""
        return sum(self.n_experts[i] * out * inp for i, per in self.shapes.items() for out, inp in per.values())

    @property
    def fraction_of_expert_weights(self) -> float:
        return self.value_count / self.expert_weight_count

    def fraction_of_expert_bytes(self, bytes_per_weight: int = 2) -> float:
        """nbytes over the routed-expert weights stored at `bytes_per_weight` (2: FP16)."""
        return self.nbytes / (self.expert_weight_count * bytes_per_weight)

    def summary(self) -> dict:
        return {"unit": self.unit, "frac": self.frac, "layers": self.layers, "nbytes": self.nbytes,
                "index_nbytes": self.index_nbytes, "values": self.value_count,
                "value_dtype": str(next(iter(self.values[self.layers[0]].values())).dtype).replace("torch.", ""),
                "fraction_of_expert_weights": self.fraction_of_expert_weights,
                "fraction_of_expert_bytes_fp16": self.fraction_of_expert_bytes(2),
                "channels_per_expert": {p: int(self.values[self.layers[0]][p].shape[1]) for p in PROJECTIONS}}

    # --- validation ------------------------------------------------------------------------

    def validate(self, model) -> None:
        """Refuse a model this cache was not built for: its MoE layers, expert counts, weight shapes."""
        layers = {layer.index: layer for layer in moe_layers(model)}
        if sorted(layers) != self.layers:
            raise UserError(f"the channel cache covers MoE layers {self.layers}, the model has {sorted(layers)}")
        for i, layer in layers.items():
            if layer.n_experts != self.n_experts[i]:
                raise UserError(f"channel cache layer {i} has {self.n_experts[i]} experts, the model {layer.n_experts}")
            for p in PROJECTIONS:
                shape = tuple(layer.weight(0, p).shape)
                if shape != tuple(self.shapes[i][p]):
                    raise UserError(f"channel cache layer {i} {p}: expert weights {tuple(self.shapes[i][p])}, "
                                    f"the model's are {shape}")

    def _check_consistent(self, where: str) -> None:
        """The tensors agree with the recorded shapes (a hand-edited or truncated file fails here)."""
        for i in self.layers:
            for p in PROJECTIONS:
                name, axis = SLICES[self.unit][p]
                out, inp = self.shapes[i][p]
                idx, vals = self.index[i].get(name), self.values[i].get(p)
                if idx is None or vals is None:
                    raise UserError(f"{where}: layer {i} lacks the '{name}' indices or the {p} values")
                limit, length = (out, inp) if axis == 0 else (inp, out)
                if vals.shape != (self.n_experts[i], idx.shape[1], length) or idx.shape[0] != self.n_experts[i]:
                    raise UserError(f"{where}: layer {i} {p}: values {tuple(vals.shape)} and indices "
                                    f"{tuple(idx.shape)} do not fit experts of shape {(out, inp)}")
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= limit):
                    raise UserError(f"{where}: layer {i} {p}: a channel index is outside [0, {limit})")
            if self.widths and tuple(self.rtn_error[i].shape) != (self.n_experts[i], len(self.widths)):
                raise UserError(f"{where}: layer {i}: error table {tuple(self.rtn_error[i].shape)} is not "
                                f"[{self.n_experts[i]}, {len(self.widths)}]")

    # --- files -----------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """path.safetensors (tensors) + path.json (metadata): no pickles."""
        path = Path(path)
        tensors = {}
        for i in self.layers:
            for name, t in self.index[i].items():
                tensors[f"{i}/index/{name}"] = t
            for p, t in self.values[i].items():
                tensors[f"{i}/values/{p}"] = t
            if i in self.rtn_error:
                tensors[f"{i}/rtn_error"] = self.rtn_error[i]
        save_tensors_atomic(path.with_suffix(".safetensors"), tensors)
        write_json_atomic(path.with_suffix(".json"), {
            "schema_version": SCHEMA_VERSION, "unit": self.unit, "frac": self.frac, "layers": self.layers,
            "n_experts": {str(i): n for i, n in self.n_experts.items()},
            "shapes": {str(i): {p: list(s) for p, s in per.items()} for i, per in self.shapes.items()},
            "index_sets": sorted({name for name, _ in SLICES[self.unit].values()}),
            "widths": self.widths, "group_size": self.group_size, "sym": self.sym, "meta": self.meta})

    @classmethod
    def load(cls, path: Path, model=None) -> "ChannelCache":
        """Read a saved cache; with `model`, also check it was built for that model's shapes."""
        path = Path(path)
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            tensors = load_file(str(path.with_suffix(".safetensors")))
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"cannot read channel cache {path}: {err}") from None
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"{path}: channel cache schema {meta.get('schema_version')}, expected {SCHEMA_VERSION}")
        if meta.get("unit") not in SLICES:
            raise UserError(f"{path}: unknown unit {meta.get('unit')!r}; expected one of {', '.join(SLICES)}")
        layers = [int(i) for i in meta["layers"]]
        try:
            cache = cls(unit=meta["unit"], frac=float(meta["frac"]),
                        index={i: {n: tensors[f"{i}/index/{n}"] for n in meta["index_sets"]} for i in layers},
                        values={i: {p: tensors[f"{i}/values/{p}"] for p in PROJECTIONS} for i in layers},
                        shapes={i: {p: tuple(s) for p, s in meta["shapes"][str(i)].items()} for i in layers},
                        n_experts={i: int(meta["n_experts"][str(i)]) for i in layers},
                        widths=list(meta["widths"]), group_size=int(meta["group_size"]), sym=bool(meta["sym"]),
                        rtn_error={i: tensors[f"{i}/rtn_error"] for i in layers} if meta["widths"] else {},
                        meta=meta.get("meta", {}))
        except KeyError as err:
            raise UserError(f"{path}: channel cache file lacks {err}") from None
        cache._check_consistent(str(path))
        if model is not None:
            cache.validate(model)
        return cache

