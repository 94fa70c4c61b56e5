"""Full-precision output rows on top of packed experts: DynaMo's channel cache in a packed model.

DQS (dynamo.switching) keeps the ~1% most dataset-sensitive output rows of every expert
projection in FP16 and rewrites them when the data changes. A packed matrix cannot hold a row
at another width than its codes, so a packed layer keeps those rows apart, at the model's
dtype: `ChannelRows` holds, per projection, the row indices [E, c] and their values [E, c, K].
The packed kernels compute every row from the codes; `patch` then overwrites the cached rows'
outputs with x @ values^T. The result equals a dense model whose weight rows were replaced
by `values` (what the switcher writes into a fake-quantized model). A switch rewrites
`values` in place; indices never change after the cache is built.

Only the row unit has this form. A neuron's down slice is a column, which every output of
the down projection reads, so it cannot be patched after the matmul; building ChannelRows
from a neuron cache is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .projections import PROJECTIONS

GATHER_ELEMENTS = 1 << 24  # values gathered per chunk of routed rows in `patch_rows` (64 MiB in fp32)


@dataclass
class ChannelRows:
    index: dict[str, torch.Tensor]   # projection -> [E, c] int64 output rows of every expert
    values: dict[str, torch.Tensor]  # projection -> [E, c, K] their weights, at the model's dtype

    def __post_init__(self):
        for p in PROJECTIONS:
            idx, vals = self.index[p], self.values[p]
            if idx.dim() != 2 or vals.dim() != 3 or tuple(vals.shape[:2]) != tuple(idx.shape):
                raise ValueError(f"{p}: indices {tuple(idx.shape)} and values {tuple(vals.shape)} must be "
                                 f"[E, c] and [E, c, K]")

    @classmethod
    def from_weights(cls, index: dict[str, torch.Tensor], weight) -> ChannelRows:
        """The rows `index[p][e]` of `weight(e, p)` (a dense [N, K] matrix): what the model holds there now."""
        values = {p: torch.stack([weight(e, p)[index[p][e].long()] for e in range(index[p].shape[0])])
                  for p in PROJECTIONS}
        return cls({p: index[p].long() for p in PROJECTIONS}, values)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.index, self.values) for t in d.values())

    def patch(self, projection: str, expert: int, x: torch.Tensor, out: torch.Tensor) -> None:
        """Overwrite the cached rows' outputs: out[:, c] = x @ values[c]^T (fp32 accumulation).

        out [m, N] holds x [m, K] @ W^T computed from the codes for `expert`.
        """
        channels = self.index[projection][expert]
        if channels.numel() and x.shape[0]:
            out[:, channels] = (x.float() @ self.values[projection][expert].to(x.dtype).float().T).to(out.dtype)

    def patch_rows(self, projection: str, experts: torch.Tensor, x: torch.Tensor, in_div: int, out: torch.Tensor,
                   col_offset: int = 0) -> None:
        """Every routed row at once: out[r, col_offset + c] = values[experts[r], c] @ x[r // in_div].

        `experts` [R] is each row's expert and `out` [R, ...] the stage output. Unlike a loop over
        experts this never waits on the host (no data-dependent Python control flow), which matters
        at decode. The gathered values are [rows, c, K], so rows go in chunks that bound that tensor.
        """
        index, values = self.index[projection], self.values[projection]
        channels, cols = values.shape[1], values.shape[2]
        if not channels or not experts.numel():
            return
        step = max(1, GATHER_ELEMENTS // (channels * cols))
        for start in range(0, experts.numel(), step):
            stop = min(start + step, experts.numel())  # Python ints: slicing `out` must not read the device
            rows = torch.arange(start, stop, device=experts.device)
            e = experts[start:stop]
            patched = torch.bmm(values[e].to(x.dtype).float(), x[rows // in_div].float().unsqueeze(-1)).squeeze(-1)
            out[start:stop].scatter_(1, col_offset + index[e], patched.to(out.dtype))

    def to(self, device: torch.device | str) -> ChannelRows:
        return ChannelRows({p: t.to(device) for p, t in self.index.items()},
                           {p: t.to(device) for p, t in self.values.items()})
