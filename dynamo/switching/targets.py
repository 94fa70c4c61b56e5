"""Where the adaptive switch writes its slot set: a fake-quantized model's dense weights, or a packed
model's slot tables. Both take a whole `SlotSet` (or None: back to BQ) and either apply all of it or
leave the model as it was.

- `DenseTarget`: low-rank components are added to the whole matrix (W = W_bq + B A), then a row slot
  is written as W[r] += delta, then a column slot as W[:, j] += delta (one `index_copy_` per matrix
  and kind); the BQ slices it covers (the whole matrix under a low-rank path) are backed up per
  matrix, so going back restores them exactly.
- `PackedTarget`: each packed layer's `slot_table` is replaced (dynamo_kernels/slots.py); the packed
  codes are never touched, so BQ is simply "no table".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynamo_kernels.packing import PackedWeight
from dynamo_kernels.slots import LowRankGroup, SlotTable

from ..adapters import PROJECTIONS, moe_layers
from ..errors import UserError
from .slotset import SlotSet
from .store import Key

DENSE_BITS = 16


@dataclass
class Change:
    """One matrix's part of a slot set, as float32 tensors on the matrix's device."""

    rows: torch.Tensor                  # [r] int64
    row_deltas: torch.Tensor            # [r, K]
    cols: torch.Tensor                  # [c] int64
    col_deltas: torch.Tensor            # [N, c]
    full: torch.Tensor | None = None    # [N, K] whole matrix (an expert raised to 8 bits)
    lowrank: tuple | None = None        # (A [r, K], B^T [r, N]): W += B A before the rows and columns

    @classmethod
    def of(cls, device, rows: tuple | None = None, cols: tuple | None = None,
           full: torch.Tensor | None = None, lowrank: tuple | None = None) -> Change:
        """From (indices [n], deltas [n, L]) of the rows and of the columns (None: no slot of that kind)."""
        none = (torch.empty(0, dtype=torch.int64), torch.empty(0, 0))
        (r, row_deltas), (c, col_deltas) = rows or none, cols or none
        if lowrank is not None:
            lowrank = tuple(t.to(device, torch.float32) for t in lowrank)
        return cls(r.to(device), row_deltas.to(device, torch.float32), c.to(device),
                   col_deltas.T.to(device, torch.float32), full, lowrank)

    @property
    def whole(self) -> bool:
        """The change touches every value of the matrix (backed up whole)."""
        return self.full is not None or self.lowrank is not None

    @property
    def values(self) -> int:
        if self.full is not None:
            return int(self.full.numel())
        factors = sum(int(t.numel()) for t in self.lowrank) if self.lowrank is not None else 0
        return int(self.row_deltas.numel() + self.col_deltas.numel()) + factors


def check_slot_set(slot_set: SlotSet, layers: dict) -> None:
    """Refuse a set that does not fit the model's MoE layers (layer, expert, index and length ranges)."""
    for i, table in slot_set.tables.items():
        layer = layers.get(i)
        if layer is None:
            raise UserError(f"the slot set has slots for layer {i}, which is not an MoE layer of this model")
        for (p, kind), group in table.groups.items():
            n, k = layer.shape(p)
            if isinstance(group, LowRankGroup):  # components: a of length K, b of length N, any index
                parts = [(group.a, k, 1 << 62), (group.b, n, 1 << 62)]
            else:
                parts = [(group, *((k, n) if kind == "rows" else (n, k)))]
            for part, length, limit in parts:
                s = int(part.index.numel())
                if (part.length != length or table.n_experts != layer.n_experts or part.expert.numel() != s or
                        part.codes.shape[0] != s or (s and (int(part.index.max()) >= limit or
                                                            int(part.index.min()) < 0 or
                                                            int(part.expert.max()) >= layer.n_experts))):
                    raise UserError(f"the slot set's layer {i} {p} {kind} do not fit this model ({s} slots of "
                                    f"{part.length} values; the model's matrices are [{n}, {k}])")
    for (i, e, p) in slot_set.experts8:
        if i not in layers or not 0 <= e < layers[i].n_experts or p not in PROJECTIONS:
            raise UserError(f"the slot set raises layer {i} expert {e} {p}, which this model does not have")


def changes_of(slot_set: SlotSet, device_of) -> dict[Key, Change]:
    """Per matrix: its row and column deltas (float32), or its whole 8-bit values."""
    changes: dict[Key, Change] = {}
    for i, table in slot_set.tables.items():
        for p in PROJECTIONS:
            parts = {}
            lowrank = table.groups.get((p, "lowrank"))
            if lowrank is not None:
                for e in torch.unique(lowrank.expert).tolist():
                    parts.setdefault(e, {})["lowrank"] = lowrank.factors(e)
            for kind in ("rows", "cols"):
                group = table.groups.get((p, kind))
                if group is None:
                    continue
                deltas, counts, starts = group.deltas(), group.counts.tolist(), group.starts.tolist()
                for e, (start, count) in enumerate(zip(starts, counts)):
                    if count:
                        parts.setdefault(e, {})[kind] = (group.index[start:start + count], deltas[start:start + count])
            for e, kinds in parts.items():
                changes[(i, e, p)] = Change.of(device_of((i, e, p)), kinds.get("rows"), kinds.get("cols"),
                                               lowrank=kinds.get("lowrank"))
    for key, q in slot_set.experts8.items():
        device = device_of(key)
        changes[key] = Change.of(device, full=q.to(device).dequantize())
    return changes


def _write_matrix(weight: torch.Tensor, change: Change) -> None:
    """One matrix's slots into the model. A module-level seam so tests can make writing fail half-way."""
    if change.full is not None:
        weight.copy_(change.full.to(weight.dtype))
        return
    if change.lowrank is not None:
        a, bt = change.lowrank
        weight.copy_((weight.float() + bt.T @ a).to(weight.dtype))
    if change.rows.numel():
        weight.index_copy_(0, change.rows, (weight[change.rows].float() + change.row_deltas).to(weight.dtype))
    if change.cols.numel():
        cols = weight.index_select(1, change.cols).float() + change.col_deltas
        weight.index_copy_(1, change.cols, cols.to(weight.dtype))


@dataclass
class _Backup:
    rows: torch.Tensor
    bq_rows: torch.Tensor
    cols: torch.Tensor
    bq_cols: torch.Tensor
    full: torch.Tensor | None

    def restore(self, weight: torch.Tensor) -> None:
        if self.full is not None:
            weight.copy_(self.full)
            return
        weight.index_copy_(1, self.cols, self.bq_cols)
        weight.index_copy_(0, self.rows, self.bq_rows)

    @classmethod
    def of(cls, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, full: bool) -> _Backup:
        return cls(rows, weight.index_select(0, rows), cols, weight.index_select(1, cols),
                   weight.clone() if full else None)


class DenseTarget:
    """A fake-quantized model: BQ values in its dense expert weights, slots written into them."""

    form = "fake-quantized"
    expert_outputs = None  # profiled from the dense weights

    def __init__(self, model, plan):
        self.layers = {layer.index: layer for layer in moe_layers(model)}
        self.plan = plan
        self.group_size = plan.default.group_size
        self.backup: dict[Key, _Backup] = {}

    def weight(self, key: Key) -> torch.Tensor:
        i, e, p = key
        return self.layers[i].weight(e, p)

    def device(self, key: Key) -> torch.device:
        return self.weight(key).device

    def bq_bits(self, key: Key) -> int:
        return self.plan.spec_for(*key).bits

    def bq(self, key: Key) -> torch.Tensor:
        """The matrix's BQ values, float32, a fresh tensor on the weight's device."""
        w = self.weight(key).detach().clone()
        if key in self.backup:
            self.backup[key].restore(w)
        return w.float()

    def effective(self, key: Key, active: SlotSet | None) -> torch.Tensor:
        return self.weight(key)

    def apply(self, slot_set: SlotSet | None) -> int:
        """Make the model hold BQ + `slot_set` (None: BQ). All or nothing: on a failure every touched slice
        is put back as it was."""
        if slot_set is not None:
            check_slot_set(slot_set, self.layers)
        changes = changes_of(slot_set, self.device) if slot_set is not None else {}
        touched = list(dict.fromkeys([*self.backup, *changes]))
        snapshots = {}
        for key in touched:
            old, new = self.backup.get(key), changes.get(key)
            parts = [b for b in (old, new) if b is not None]
            rows = torch.cat([b.rows for b in parts]).unique()
            cols = torch.cat([b.cols for b in parts]).unique()
            whole = (old is not None and old.full is not None) or (new is not None and new.whole)
            snapshots[key] = _Backup.of(self.weight(key), rows, cols, whole)
        backups, written = {}, 0
        try:
            for key in touched:
                weight = self.weight(key)
                if key in self.backup:
                    self.backup[key].restore(weight)
                change = changes.get(key)
                if change is not None:
                    backups[key] = _Backup.of(weight, change.rows, change.cols, change.whole)
                    _write_matrix(weight, change)
                    written += change.values
        except BaseException:
            for key, snapshot in snapshots.items():
                snapshot.restore(self.weight(key))
            raise
        self.backup = backups
        return written


class PackedTarget:
    """A model with attached packed layers (dynamo.packed.model.attach_packed): slots go to the slot tables."""

    form = "packed"

    def __init__(self, model, plan=None):
        from ..packed.model import packed_modules
        from ..packed.switching import packed_expert_outputs

        self.expert_outputs = packed_expert_outputs
        self.modules = packed_modules(model)
        self.layers = {layer.index: layer for layer in moe_layers(model)}
        widths = {(i, e, p): module.experts().weight(e, p) for i, module in self.modules.items()
                  for e in range(module.n_experts) for p in PROJECTIONS}
        self._bits = {k: w.bits if isinstance(w, PackedWeight) else DENSE_BITS for k, w in widths.items()}
        groups = [w.group_size for w in widths.values() if isinstance(w, PackedWeight)]
        self.group_size = plan.default.group_size if plan is not None else (groups[0] if groups else -1)

    def device(self, key: Key) -> torch.device:
        return self.modules[key[0]].stacks[next(iter(self.modules[key[0]].stacks))].experts.device

    def bq_bits(self, key: Key) -> int:
        return self._bits[key]

    def bq(self, key: Key) -> torch.Tensor:
        i, e, p = key
        w = self.modules[i].experts().weight(e, p)
        return w.dequantize(torch.float32) if isinstance(w, PackedWeight) else w.detach().float().clone()

    def effective(self, key: Key, active: SlotSet | None) -> torch.Tensor:
        """BQ plus the active slots, as a dense matrix (what the packed layer computes with)."""
        w = self.bq(key)
        change = changes_of(active, self.device).get(key) if active is not None else None
        if change is not None:
            _write_matrix(w, change)
        return w

    def apply(self, slot_set: SlotSet | None) -> int:
        """Replace every packed layer's slot table (built whole before any is swapped in)."""
        tables: dict[int, SlotTable | None] = {i: None for i in self.modules}
        if slot_set is not None:
            check_slot_set(slot_set, self.layers)
            if slot_set.experts8:
                raise UserError("a packed model serves row, column and low-rank slots only; this set raises whole "
                                "experts")
            tables.update({i: t.to(self.device((i, 0, "gate"))) for i, t in slot_set.tables.items()})
        for i, table in tables.items():
            self.modules[i].slot_table = table
        return sum(g.values for t in tables.values() if t is not None for g in t.groups.values())


def target_for(model, plan):
    """The packed target when the model has attached packed layers, else the dense one."""
    from ..packed.model import attached_packed

    layers = list(moe_layers(model))
    if layers and all(attached_packed(layer) is not None for layer in layers):
        return PackedTarget(model, plan)
    if plan is None:
        raise UserError("the adaptive switch on a fake-quantized model needs its QuantPlan")
    return DenseTarget(model, plan)
