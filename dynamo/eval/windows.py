"""Cutting a token stream into evaluation windows, optionally each opened by a BOS token.

Models trained with a BOS token at every window start (the realistic testbed; most hub LLMs
prepend one) are evaluated, calibrated and trained on windows of the same shape: BOS followed
by seqlen - 1 tokens of the stream. The loss is never taken on predicting BOS itself.
"""

from __future__ import annotations

import torch


def window_span(seqlen: int, bos_id: int | None = None) -> int:
    """Tokens of the stream one window holds: seqlen, or seqlen - 1 after its BOS."""
    return seqlen - (bos_id is not None)


def cut_windows(ids: torch.Tensor | list[int], seqlen: int, max_windows: int | None = None,
                bos_id: int | None = None) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows; the tail shorter than a window is dropped."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    span = window_span(seqlen, bos_id)
    n = ids.numel() // span
    if max_windows is not None:
        n = min(n, max_windows)
    windows = ids[: n * span].view(n, span)
    if bos_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), windows], dim=1)
    return windows
