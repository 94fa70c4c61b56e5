"""One MoE layer's routed experts in packed form, grouped so that a layer costs few launches.

An expert layer runs in two stages: "gate_up" (the gate and up projections, both [I, H], read
the same routed tokens) and "down" ([H, I]). Within a stage, every weight with the same width,
group size and shape goes into one `WeightStack`, whose tensors are stacked along a leading
slot axis; a grouped kernel then computes all of the stack's experts in one launch. With one
bit-width per expert (what DynaMo's plans give) a layer costs one launch per distinct width
and stage. 16-bit (unquantized) experts form dense stacks that torch computes.

The per-expert weights handed to `PackedExperts.build` are not kept: `weight()` returns views
into the stacks, so the packed layer is held in memory once.

`Routing` is the per-call part: the routed rows (token t's j-th expert is row t * k + j)
sorted by expert, which every grouped launch of the call reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .channels import ChannelRows
from .packing import PackedWeight
from .slots import SlotTable
from .projections import STAGES

ExpertWeight = PackedWeight | torch.Tensor  # a dense tensor [N, K] for a 16-bit expert
DENSE_BITS = 16


def _signature(weight: ExpertWeight) -> tuple[int, int, tuple[int, int]]:
    if isinstance(weight, PackedWeight):
        return weight.bits, weight.group_size, weight.shape
    return DENSE_BITS, -1, (int(weight.shape[0]), int(weight.shape[1]))


@dataclass
class WeightStack:
    """Weights of one stage that share (bits, group_size, shape): one grouped launch."""

    bits: int                    # 16: dense weights (torch computes them)
    group_size: int
    shape: tuple[int, int]       # (N, K) of each slot's matrix
    experts: torch.Tensor        # [S] int64, the expert of each slot
    col_offsets: torch.Tensor    # [S] int64, first output column of each slot (0 gate / down, I up)
    qweight: torch.Tensor | None = None  # [S, N, packed_columns(K, bits)] int32
    scales: torch.Tensor | None = None   # [S, N, groups] float16
    zeros: torch.Tensor | None = None    # [S, groups, packed_columns(N, bits)] int32
    dense: torch.Tensor | None = None    # [S, N, K] for 16-bit stacks

    @property
    def is_dense(self) -> bool:
        return self.bits == DENSE_BITS

    @property
    def slots(self) -> int:
        return int(self.experts.numel())

    def weight(self, slot: int) -> ExpertWeight:
        """Slot's matrix, as a view into the stack."""
        if self.is_dense:
            return self.dense[slot]
        return PackedWeight(self.qweight[slot], self.scales[slot], self.zeros[slot], self.bits, self.group_size,
                            self.shape)

    @property
    def nbytes(self) -> int:
        tensors = (self.dense,) if self.is_dense else (self.qweight, self.scales, self.zeros)
        return sum(t.numel() * t.element_size() for t in tensors)

    @classmethod
    def build(cls, entries: list[tuple[int, int, ExpertWeight]]) -> WeightStack:
        """entries: (expert, column offset, weight), all with the same signature."""
        bits, group_size, shape = _signature(entries[0][2])
        device = entries[0][2].device
        experts = torch.tensor([e for e, _, _ in entries], dtype=torch.int64, device=device)
        offsets = torch.tensor([c for _, c, _ in entries], dtype=torch.int64, device=device)
        weights = [w for _, _, w in entries]
        if bits == DENSE_BITS:
            return cls(bits, group_size, shape, experts, offsets, dense=torch.stack(weights))
        return cls(bits, group_size, shape, experts, offsets, qweight=torch.stack([w.qweight for w in weights]),
                   scales=torch.stack([w.scales for w in weights]), zeros=torch.stack([w.zeros for w in weights]))


@dataclass
class PackedExperts:
    """A layer's routed experts: per stage, one WeightStack per distinct (bits, group_size, shape)."""

    n_experts: int
    hidden_size: int
    intermediate_size: int
    act: Callable[[torch.Tensor], torch.Tensor]     # the SwiGLU activation (silu for every family here)
    stages: dict[str, list[WeightStack]]
    _where: dict[tuple[int, str], tuple[str, int, int]] = field(default_factory=dict, repr=False)
    channels: ChannelRows | None = None  # full-precision rows patched over the packed outputs (channels.py)
    slot_table: SlotTable | None = None  # the adaptive switch's corrections added to the packed outputs (slots.py)

    @classmethod
    def build(cls, gate: list[ExpertWeight], up: list[ExpertWeight], down: list[ExpertWeight],
              act: Callable[[torch.Tensor], torch.Tensor], channels: ChannelRows | None = None) -> PackedExperts:
        """Per-expert gate/up [I, H] and down [H, I] weights, packed (PackedWeight) or dense (16-bit)."""
        if not len(gate) == len(up) == len(down) > 0:
            raise ValueError(f"need the same positive number of gate, up and down weights, got "
                             f"{len(gate)}, {len(up)}, {len(down)}")
        inter, hidden = _signature(gate[0])[2]
        projections = {"gate": gate, "up": up, "down": down}
        expected = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
        stages: dict[str, list[WeightStack]] = {}
        where: dict[tuple[int, str], tuple[str, int, int]] = {}
        for stage, names in STAGES.items():
            groups: dict[tuple, list[tuple[int, int, ExpertWeight]]] = {}
            members: dict[tuple, list[tuple[int, str]]] = {}
            for name in names:
                offset = inter if name == "up" else 0  # gate_up output: [:I] gate, [I:] up
                for expert, weight in enumerate(projections[name]):
                    sig = _signature(weight)
                    if sig[2] != expected[name]:
                        raise ValueError(f"expert {expert} {name}: shape {sig[2]} != {expected[name]}")
                    groups.setdefault(sig, []).append((expert, offset, weight))
                    members.setdefault(sig, []).append((expert, name))
            stages[stage] = []
            for sig, entries in groups.items():
                for slot, key in enumerate(members[sig]):
                    where[key] = (stage, len(stages[stage]), slot)
                stages[stage].append(WeightStack.build(entries))
        return cls(len(gate), hidden, inter, act, stages, where, channels)

    def weight(self, expert: int, projection: str) -> ExpertWeight:
        stage, index, slot = self._where[(expert, projection)]
        return self.stages[stage][index].weight(slot)

    @property
    def nbytes(self) -> int:
        """Packed stacks plus the full-precision channel rows and the active slots."""
        stacks = sum(stack.nbytes for stacks in self.stages.values() for stack in stacks)
        extra = sum(part.nbytes for part in (self.channels, self.slot_table) if part is not None)
        return stacks + extra

    def to(self, device: torch.device | str) -> PackedExperts:
        def moved(projection: str) -> list[ExpertWeight]:
            return [self.weight(e, projection).to(device) for e in range(self.n_experts)]

        channels = self.channels.to(device) if self.channels is not None else None
        packed = PackedExperts.build(moved("gate"), moved("up"), moved("down"), self.act, channels)
        packed.slot_table = self.slot_table.to(device) if self.slot_table is not None else None
        return packed


@dataclass
class Routing:
    """The routed rows of one call, sorted by expert (shared by every grouped launch of the call)."""

    top_k: int
    order: torch.Tensor   # [T * k] int64 routed-row ids, grouped by expert (stable within an expert)
    counts: torch.Tensor  # [E] int64 rows routed to each expert
    starts: torch.Tensor  # [E] int64 position of each expert's first row in `order`

    @classmethod
    def build(cls, top_k_index: torch.Tensor, n_experts: int) -> Routing:
        flat = top_k_index.reshape(-1).to(torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n_experts):
            raise ValueError(f"expert ids must lie in [0, {n_experts}), got {int(flat.min())}..{int(flat.max())}")
        counts = torch.bincount(flat, minlength=n_experts)
        return cls(top_k=int(top_k_index.shape[-1]), order=torch.argsort(flat, stable=True), counts=counts,
                   starts=torch.cumsum(counts, 0) - counts)

    def rows_of(self, expert: int) -> torch.Tensor:
        start, count = int(self.starts[expert]), int(self.counts[expert])
        return self.order[start:start + count]
