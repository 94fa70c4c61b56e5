"""Numbers are checked before they are used or recorded: no NaN or Inf in weights, metrics or records.

A checkpoint with NaN in one expert used to give `ppl code nan`, exit 0, and a record that is not
valid JSON which resume then reused. The record walk is generic: any number anywhere in a record
(metrics added later included) is checked, and the path of each bad one is named.
"""

from __future__ import annotations

import math
import re

import torch

from .errors import UserError

_EXPERT = re.compile(r"layers\.(\d+)\..*experts\.(\d+)\.(\w+?)(?:\.weight)?$")
_FUSED = re.compile(r"layers\.(\d+)\..*experts\.(\w+?)(?:\.weight)?$")
SHOWN = 3  # bad paths named in the message


def nonfinite_paths(value, path: str = "") -> list[str]:
    """Dotted paths of every float in a JSON-like value that is NaN or infinite."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in nonfinite_paths(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in nonfinite_paths(v, f"{path}[{i}]")]
    return []


def check_finite(payload: dict, what: str, hint: str) -> None:
    """UserError naming the non-finite numbers in `payload` (a record, or a file beside it)."""
    bad = nonfinite_paths(payload)
    if bad:
        more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise UserError(f"{what} has non-finite values at {', '.join(bad[:SHOWN])}{more}; {hint}")


def describe_weight(name: str, tensor: torch.Tensor) -> str:
    """'layer 1, expert 3, gate_proj' for an expert weight (fused [E, ...] tensors included), else the name."""
    m = _EXPERT.search(name)
    if m:
        return f"layer {m.group(1)}, expert {m.group(2)}, {m.group(3)} ({name})"
    m = _FUSED.search(name)
    if m and tensor.dim() == 3:
        expert = int((~torch.isfinite(tensor)).flatten(1).any(dim=1).nonzero()[0])
        return f"layer {m.group(1)}, expert {expert}, {m.group(2)} ({name})"
    return name


def check_weights_finite(model: torch.nn.Module, when: str, hint: str) -> None:
    """UserError naming the first weights (layer, expert, matrix) that hold NaN or Inf."""
    bad = []
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if b.is_floating_point())]
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad.append(describe_weight(name, tensor.detach()))
            if len(bad) > SHOWN:
                break
    if bad:
        more = " and more" if len(bad) > SHOWN else ""
        raise UserError(f"{when}: NaN or Inf in {'; '.join(bad[:SHOWN])}{more}; {hint}")
