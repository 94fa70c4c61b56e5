"""The routed experts' output error the model really has: what a switch removes, measured instead of estimated.

The adaptive switch chooses its slots by an estimate (`AdaptiveReport.expected_reduction`: tr(D H D^T) per matrix
on the profile windows, gate/up errors carried to the expert's output to first order). This measures the quantity
it stands for, on other windows and through the whole SwiGLU expert: over every routed token x (router weight r)
of every MoE layer,

    E(W) = sum r ||f_ref(x) - f_W(x)||^2

for the weights the model holds now and for a base (BQ). Both are taken on the same x, the routed inputs of the
model as it is now, so their ratio compares weights, not inputs: removed = 1 - E(now) / E(base).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..adapters import expert_compute
from ..calibration.capture import mlp_outputs

Key = tuple[int, int, str]  # (layer, expert, projection), as dynamo.switching.store.Key
Weights = Callable[[Key], torch.Tensor]


@dataclass(frozen=True)
class RoutedError:
    """Router-weighted squared output error of the routed experts against the reference, summed over tokens."""

    base: float     # the base weights' (BQ)
    now: float      # the weights the model holds now
    tokens: int     # routed (token, expert) pairs measured

    @property
    def removed(self) -> float:
        """Share of the base's error the current weights remove (0 where the base has none: nothing to remove)."""
        return 1.0 - self.now / self.base if self.base > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "removed": self.removed}


def _down(get: Weights, layer, e: int, act, x: torch.Tensor) -> torch.Tensor:
    gate, up, down = (get((layer.index, e, p)).to(x.device, x.dtype) for p in ("gate", "up", "down"))
    return mlp_outputs(gate, up, down, act, x)["down"]


@torch.no_grad()
def routed_error(model, windows: torch.Tensor, reference: Weights, base: Weights, *,
                 batch_size: int = 8) -> RoutedError:
    """E(now) and E(base) over `windows` [N, T]; `reference(key)` and `base(key)` give an expert matrix [out, in]
    (e.g. the FP16 master's `get`, and a copy of BQ taken before the switch)."""
    sums = {"base": 0.0, "now": 0.0, "tokens": 0}

    def routed(layer, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        act = layer.activation()
        now_weight = lambda key: layer.weight(key[1], key[2])  # noqa: E731
        for e in top_k_index.unique().tolist():
            if not 0 <= e < layer.n_experts:  # padding slots (expert-parallel layouts)
                continue
            token, slot = torch.where(top_k_index == e)
            x, r = hidden[token], top_k_weights[token, slot].double()
            now = _down(now_weight, layer, e, act, x)
            ref = _down(reference, layer, e, act, x)
            sums["now"] += float((r * (ref - now).double().square().sum(-1)).sum())
            sums["base"] += float((r * (ref - _down(base, layer, e, act, x)).double().square().sum(-1)).sum())
            sums["tokens"] += len(token)
            out.index_add_(0, token, (now * r[:, None].to(now.dtype)).to(out.dtype))  # the model runs as it is
        return out

    device = model.get_input_embeddings().weight.device
    with expert_compute(model, routed):
        for start in range(0, len(windows), batch_size):
            model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
    return RoutedError(base=sums["base"], now=sums["now"], tokens=sums["tokens"])
