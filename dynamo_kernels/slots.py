"""The adaptive switch's slots on a packed layer: additive corrections beside the packed codes.

DQS (dynamo.switching.adaptive) restores a few rows and input columns of each expert matrix
per dataset. A packed matrix cannot hold them at another width than its codes, so a packed
layer keeps them apart, in a `SlotTable`, as *corrections* of the BQ weight:

    row slot (r, delta [K]):  y[:, r] += x @ delta          (output row r of W gets W_bq[r] + delta)
    column slot (j, delta [N]): y += x[:, j] * delta        (input column j gets W_bq[:, j] + delta)

    low-rank component (a [K], b [N]): y += (x @ a) b   (W gets W_bq + b a^T; an expert's
                                                      components: W_bq + B A, a rank-r path)

so the packed layer computes x @ (W_bq + B A + P_R D_R + D_C P_C)^T, exactly what the fake-quantized
model holds after the switch wrote the same corrections into its dense weight (low-rank first, then
rows, then columns; each measured after the ones before it were applied). The codes are never
touched: a switch replaces the table's small tensors, a switch back to BQ empties it.

Deltas are stored as 8-bit codes with an fp16 scale and zero per group along the slot
(`bits=8`, about one byte a value) or as fp16 values (`bits=16`); the padding an expert
without slots needs costs nothing, because slots are stored flat, sorted by expert, and
gathered per routed row (`starts`/`counts`) with no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .projections import PROJECTIONS

KINDS = ("rows", "cols", "lowrank")
GATHER_ELEMENTS = 1 << 24  # delta values gathered per chunk of routed rows (64 MiB in fp32)
SLOT_BITS = (8, 16)


def slot_nbytes(length: int, bits: int, group_size: int) -> int:
    """Device bytes of one slot of `length` values, as `SlotGroup.nbytes` counts them: fp16 values (16 bits),
    or 8-bit codes with an fp16 scale and zero per group; plus an int32 index. What a switch's budget spends."""
    if bits == 16:
        return 2 * length + 4
    groups = 1 if group_size == -1 else -(-length // group_size)
    return length + groups * 2 * 2 + 4


def quantize_deltas(deltas: torch.Tensor, bits: int, group_size: int) -> tuple:
    """deltas [S, L] -> (codes, scales, zeros): 8-bit RTN codes (uint8) with fp16 scale and zero per
    group of `group_size` values along L (asymmetric); 16 bits: fp16 values, no scales."""
    if bits == 16:
        return deltas.to(torch.float16), None, None
    if bits != 8:
        raise ValueError(f"slot deltas are held at 8 or 16 bits, got {bits}")
    s, length = deltas.shape
    group = length if group_size == -1 else group_size
    pad = -length % group
    w = torch.nn.functional.pad(deltas.float(), (0, pad)).view(s, (length + pad) // group, group)
    xmin, xmax = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    exact = (xmax - xmin) / 255
    scale = exact.to(torch.float16)  # rounded up where fp16 rounded down, so the group's range always fits
    scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group (or fp16 underflow)
    zero = torch.round(-xmin / scale.float()).clamp(0, 255)
    codes = torch.clamp(torch.round(w / scale.float()[..., None]) + zero[..., None], 0, 255)
    codes = codes.reshape(s, length + pad)[:, :length].to(torch.uint8)
    return codes, scale, zero.to(torch.float16)


def dequantize_deltas(codes: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None,
                      group_size: int) -> torch.Tensor:
    """The float32 deltas of (codes [..., L], scales / zeros [..., G]) as `quantize_deltas` wrote them."""
    if scales is None:
        return codes.float()
    length = codes.shape[-1]
    group = length if group_size == -1 else group_size
    g = torch.arange(length, device=codes.device) // group
    return scales.float()[..., g] * (codes.float() - zeros.float()[..., g])


def _add_per_expert(add_expert, experts: torch.Tensor, x: torch.Tensor, in_div: int, target: torch.Tensor) -> None:
    """The routed rows grouped by expert, one `add_expert(e, x_e, y_e)` each (reads the experts on the host):
    past one gathered chunk, a matmul per expert instead of its corrections repeated for each of its rows."""
    xs = x[torch.arange(experts.numel(), device=x.device) // in_div]
    for e in torch.unique(experts).tolist():
        rows = torch.nonzero(experts == e).squeeze(1)
        part = target[rows]
        add_expert(e, xs[rows], part)
        target[rows] = part


@dataclass
class SlotGroup:
    """The slots of one kind (rows or columns) of one projection of a layer, sorted by expert."""

    expert: torch.Tensor          # [S] int64, ascending
    index: torch.Tensor           # [S] int64 the row (rows) or input column (cols) of each slot
    codes: torch.Tensor           # [S, L] uint8 (8 bits) or float16 (16 bits); L = K for rows, N for cols
    scales: torch.Tensor | None   # [S, G] float16 (8 bits)
    zeros: torch.Tensor | None    # [S, G] float16, integer-valued (8 bits)
    group_size: int
    starts: torch.Tensor          # [E] int64 first slot of each expert
    counts: torch.Tensor          # [E] int64 slots of each expert
    widest: int                   # max(counts): slots gathered per routed row
    _host: tuple | None = field(default=None, repr=False, compare=False)  # (starts, counts) as lists, group index

    @classmethod
    def build(cls, n_experts: int, expert: torch.Tensor, index: torch.Tensor, deltas: torch.Tensor, bits: int,
              group_size: int) -> SlotGroup:
        """From unsorted slots: expert [S], index [S] and their float deltas [S, L]."""
        order = torch.argsort(expert * (index.max() + 1 if index.numel() else 1) + index)
        expert, index, deltas = expert[order].long(), index[order].long(), deltas[order]
        codes, scales, zeros = quantize_deltas(deltas, bits, group_size)
        counts = torch.bincount(expert, minlength=n_experts)
        return cls(expert, index, codes, scales, zeros, group_size, torch.cumsum(counts, 0) - counts, counts,
                   int(counts.max()) if counts.numel() else 0)

    @property
    def bits(self) -> int:
        return 8 if self.scales is not None else 16

    @property
    def length(self) -> int:
        return int(self.codes.shape[1])

    def deltas(self) -> torch.Tensor:
        """[S, L] float32: what each slot adds to its row or column."""
        return dequantize_deltas(self.codes, self.scales, self.zeros, self.group_size)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"expert": self.expert, "index": self.index, "codes": self.codes}
        if self.scales is not None:
            out |= {"scales": self.scales, "zeros": self.zeros}
        return out

    @classmethod
    def from_tensors(cls, n_experts: int, tensors: dict[str, torch.Tensor], group_size: int) -> SlotGroup:
        expert = tensors["expert"].long()
        if expert.numel() > 1 and bool((expert[1:] < expert[:-1]).any()):
            raise ValueError("slot experts must be sorted")
        counts = torch.bincount(expert, minlength=n_experts)
        return cls(expert, tensors["index"].long(), tensors["codes"], tensors.get("scales"), tensors.get("zeros"),
                   group_size, torch.cumsum(counts, 0) - counts, counts, int(counts.max()) if counts.numel() else 0)

    @property
    def values(self) -> int:
        """Weights the slots hold (for exact bits)."""
        return int(self.codes.numel())

    @property
    def nbytes(self) -> int:
        """Device bytes: the codes (or values), scales and zeros, and one int32 index a slot."""
        payload = sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros) if t is not None)
        return payload + 4 * int(self.index.numel())

    def to(self, device) -> SlotGroup:
        move = (lambda t: None if t is None else t.to(device))
        return SlotGroup(move(self.expert), move(self.index), move(self.codes), move(self.scales), move(self.zeros),
                         self.group_size, move(self.starts), move(self.counts), self.widest)

    def _gather(self, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For routed rows of `experts` [R]: slot positions [R, widest], validity, and the deltas [R, widest, L]
        (zero where invalid)."""
        slot = torch.arange(self.widest, device=experts.device)
        valid = slot[None, :] < self.counts[experts][:, None]
        pos = torch.where(valid, self.starts[experts][:, None] + slot[None, :], 0)
        codes = self.codes[pos]
        scales = None if self.scales is None else self.scales[pos]
        zeros = None if self.zeros is None else self.zeros[pos]
        deltas = dequantize_deltas(codes, scales, zeros, self.group_size) * valid[..., None]
        return pos, valid, deltas

    def _expert_deltas(self, expert: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One expert's (indices [count], float32 deltas [count, L]), or None when it has no slot here."""
        if self._host is None:  # read once per table: the per-expert paths run a few hundred times a forward
            group = self.length if self.group_size == -1 else self.group_size
            self._host = (self.starts.tolist(), self.counts.tolist(),
                          torch.arange(self.length, device=self.codes.device) // group)
        starts, counts, g = self._host
        start, count = starts[expert], counts[expert]
        if not count:
            return None
        part = slice(start, start + count)
        deltas = self.codes[part].float()
        if self.scales is not None:
            deltas = self.scales[part].float()[:, g] * (deltas - self.zeros[part].float()[:, g])
        return self.index[part], deltas

    def fold(self, kind: str, expert: int, weight: torch.Tensor) -> None:
        """Add one expert's corrections into its dense float32 weight [N, K] (rows: W[r] += delta; cols:
        W[:, j] += delta): where the weight is dequantized anyway, this costs no extra matmul."""
        found = self._expert_deltas(expert)
        if found is None:
            return
        index, deltas = found
        if kind == "rows":
            weight[index] += deltas
        else:
            weight[:, index] += deltas.T

    def add_expert(self, kind: str, expert: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """One expert's corrections on its own rows x [m, K] -> y [m, N]: one small matmul (reads the counts)."""
        found = self._expert_deltas(expert) if x.shape[0] else None
        if found is None:
            return
        index, deltas = found
        if kind == "rows":
            y.index_add_(1, index, (x.float() @ deltas.T).to(y.dtype))
        else:
            y += (x.float()[:, index] @ deltas).to(y.dtype)

    def add_to(self, kind: str, experts: torch.Tensor, x: torch.Tensor, in_div: int, out: torch.Tensor,
               col_offset: int, width: int) -> None:
        """Every routed row at once: out[r, col_offset:col_offset + width] += its expert's slot corrections of
        x[r // in_div]. Rows go in chunks that bound the gathered [rows, widest, L] deltas. Gathering repeats an
        expert's deltas for each of its rows: right for decode (few rows, no host synchronisation); past one
        chunk, the rows are grouped by expert instead (a matmul per expert, reading the counts on the host)."""
        if not self.widest or not experts.numel():
            return
        if experts.numel() * self.widest * self.length > GATHER_ELEMENTS:
            _add_per_expert(lambda e, xe, ye: self.add_expert(kind, e, xe, ye), experts, x, in_div,
                            out[:, col_offset:col_offset + width])
            return
        step = max(1, GATHER_ELEMENTS // (self.widest * self.length))
        for start in range(0, experts.numel(), step):
            stop = min(start + step, experts.numel())  # Python ints: slicing must not read the device
            rows = torch.arange(start, stop, device=experts.device)
            xs = x[rows // in_div].float()
            pos, valid, deltas = self._gather(experts[start:stop])
            target = out[start:stop, col_offset:col_offset + width]
            if kind == "rows":  # [R, widest] outputs of the slot rows, added at their row indices
                added = torch.bmm(deltas, xs.unsqueeze(-1)).squeeze(-1)
                target.scatter_add_(1, self.index[pos], added.to(out.dtype))
            else:  # x's slot columns [R, widest] times their deltas [R, widest, N]
                picked = torch.gather(xs, 1, self.index[pos]) * valid
                target += torch.bmm(picked.unsqueeze(1), deltas).squeeze(1).to(out.dtype)


@dataclass
class LowRankGroup:
    """The low-rank corrections of one projection of a layer: per expert, components (a_k [K], b_k [N]) that add
    b_k (a_k . x) to the output, W_bq + B_e A_e. Stored as two slot groups sharing (expert, component index)
    order: `a` holds the input factors (rows of A, length K), `b` the output factors (columns of B, length N);
    each factor is quantized like a slot, so a rank-1 component costs one K-slot plus one N-slot."""

    a: SlotGroup
    b: SlotGroup

    @classmethod
    def build(cls, n_experts: int, expert: torch.Tensor, index: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              bits: int, group_size: int) -> LowRankGroup:
        """From unsorted components: expert [S], component index [S] (unique per expert), a [S, K], b [S, N]."""
        return cls(SlotGroup.build(n_experts, expert, index, a, bits, group_size),
                   SlotGroup.build(n_experts, expert, index, b, bits, group_size))

    @property
    def expert(self) -> torch.Tensor:
        return self.a.expert

    @property
    def index(self) -> torch.Tensor:
        return self.a.index

    @property
    def values(self) -> int:
        return self.a.values + self.b.values

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes

    def tensors(self) -> dict[str, torch.Tensor]:
        return ({f"a_{k}": t for k, t in self.a.tensors().items()} |
                {f"b_{k}": t for k, t in self.b.tensors().items() if k not in ("expert", "index")})

    @classmethod
    def from_tensors(cls, n_experts: int, tensors: dict[str, torch.Tensor], group_size: int) -> LowRankGroup:
        a = {k[2:]: t for k, t in tensors.items() if k.startswith("a_")}
        b = {k[2:]: t for k, t in tensors.items() if k.startswith("b_")} | {"expert": a["expert"], "index": a["index"]}
        return cls(SlotGroup.from_tensors(n_experts, a, group_size), SlotGroup.from_tensors(n_experts, b, group_size))

    def to(self, device) -> LowRankGroup:
        return LowRankGroup(self.a.to(device), self.b.to(device))

    def factors(self, expert: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One expert's (A [r, K], B^T [r, N]) in float32, or None when it has no component here."""
        a, b = self.a._expert_deltas(expert), self.b._expert_deltas(expert)
        return None if a is None else (a[1], b[1])

    def fold(self, expert: int, weight: torch.Tensor) -> None:
        found = self.factors(expert)
        if found is not None:
            weight += found[1].T @ found[0]

    def add_expert(self, expert: int, x: torch.Tensor, y: torch.Tensor) -> None:
        found = self.factors(expert) if x.shape[0] else None
        if found is not None:
            y += ((x.float() @ found[0].T) @ found[1]).to(y.dtype)

    def add_to(self, experts: torch.Tensor, x: torch.Tensor, in_div: int, out: torch.Tensor, col_offset: int,
               width: int) -> None:
        """Every routed row at once, as SlotGroup.add_to: gathered factors per row for decode-sized batches,
        a matmul pair per expert past one chunk."""
        widest, length = self.a.widest, self.a.length + self.b.length
        if not widest or not experts.numel():
            return
        target = out[:, col_offset:col_offset + width]
        if experts.numel() * widest * length > GATHER_ELEMENTS:
            _add_per_expert(self.add_expert, experts, x, in_div, target)
            return
        step = max(1, GATHER_ELEMENTS // (widest * length))
        for start in range(0, experts.numel(), step):
            stop = min(start + step, experts.numel())
            rows = torch.arange(start, stop, device=experts.device)
            xs = x[rows // in_div].float()
            _, _, a = self.a._gather(experts[start:stop])      # [R, widest, K], zero where invalid
            _, _, b = self.b._gather(experts[start:stop])      # [R, widest, N]
            coef = torch.bmm(a, xs.unsqueeze(-1))              # [R, widest, 1]
            target[start:stop] += torch.bmm(coef.transpose(1, 2), b).squeeze(1).to(out.dtype)


@dataclass
class SlotTable:
    """A packed layer's active slots: per projection, row slots, column slots and low-rank components (any may
    be absent)."""

    n_experts: int
    groups: dict[tuple[str, str], SlotGroup | LowRankGroup]   # (projection, kind) -> slots

    def __post_init__(self):
        for (p, kind) in self.groups:
            if p not in PROJECTIONS or kind not in KINDS:
                raise ValueError(f"unknown slot group ({p}, {kind})")

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.groups.values())

    def to(self, device) -> SlotTable:
        return SlotTable(self.n_experts, {k: g.to(device) for k, g in self.groups.items()})

    def add(self, projection: str, experts: torch.Tensor, x: torch.Tensor, in_div: int, out: torch.Tensor,
            col_offset: int, width: int) -> None:
        """The projection's slot corrections for every routed row (row r's expert: experts[r])."""
        for kind in KINDS:
            group = self.groups.get((projection, kind))
            if isinstance(group, LowRankGroup):
                group.add_to(experts, x, in_div, out, col_offset, width)
            elif group is not None:
                group.add_to(kind, experts, x, in_div, out, col_offset, width)

    def add_expert(self, projection: str, expert: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """One expert's corrections on its own rows x [m, K] -> y [m, N]."""
        for kind in KINDS:
            group = self.groups.get((projection, kind))
            if isinstance(group, LowRankGroup):
                group.add_expert(expert, x, y)
            elif group is not None:
                group.add_expert(kind, expert, x, y)

    def covers(self, projection: str, expert: int) -> bool:
        return any((g.a if isinstance(g, LowRankGroup) else g)._expert_deltas(expert) is not None
                   for (p, _), g in self.groups.items() if p == projection)

    def fold(self, projection: str, expert: int, weight: torch.Tensor) -> None:
        """The corrections added into a dense float32 weight (all additive: the order only matters for how
        each was measured, low-rank, then rows, then columns)."""
        for kind in KINDS:
            group = self.groups.get((projection, kind))
            if isinstance(group, LowRankGroup):
                group.fold(expert, weight)
            elif group is not None:
                group.fold(kind, expert, weight)
