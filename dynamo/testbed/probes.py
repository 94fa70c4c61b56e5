"""How quantization-sensitive a MoE model is: outlier channels of the expert inputs, and
weight-only fake-quantization of its experts (routed and shared) that can be undone.

Used by `dynamo.testbed.sensitivity` (the model-card numbers) and by `dynamo.testbed.training`
(the same statistics at every training checkpoint, so the effect of tokens per parameter is
visible in the curves). They probe the testbed models, not a DynaMo run: they live here, not in
`dynamo.analysis` (DynaMo's significance analysis).

Outlier statistics follow He et al. 2024 ("Understanding and Minimising Outlier Features"):
per MoE layer, the root-mean-square s_c of each hidden channel c of the expert input (the
post-attention-norm hidden state every routed expert reads), over all tokens. We report
max(s) / median(s) and the kurtosis K = mean(s^4) / mean(s^2)^2 (K = 1 for flat channels; at
d=128 one channel 10x the others gives K ~ 25), each with and without position 0, since a
BOS/attention-sink token can be massive while the other positions stay flat.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..adapters import moe_layers
from ..quant.rtn import quantize_rtn
from ..quant.spec import QSpec


def _channel_summary(sum_sq: torch.Tensor, count: int) -> dict:
    rms = (sum_sq / max(count, 1)).sqrt()
    med = rms.median().clamp_min(1e-12)
    kurtosis = (rms.pow(4).mean() / rms.pow(2).mean().pow(2).clamp_min(1e-24)).item()
    top = torch.topk(rms, k=min(3, rms.numel())).indices.tolist()
    return {"max_over_median_rms": round((rms.max() / med).item(), 4), "kurtosis": round(kurtosis, 4),
            "top_channels": top}


@torch.no_grad()
def expert_input_outliers(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> list[dict]:
    """Per MoE layer: channel-RMS outlier statistics of the expert input, with and without position 0."""
    layers = list(moe_layers(model))
    hidden = layers[0].hidden_size
    sums = {layer.index: {"all": torch.zeros(hidden, dtype=torch.float64),
                          "no_pos0": torch.zeros(hidden, dtype=torch.float64)} for layer in layers}
    counts = {"all": 0, "no_pos0": 0}

    def hook(index):
        def record(_module, args):
            x = args[0].detach().to(torch.float64)  # [B, T, H]
            sums[index]["all"] += x.pow(2).sum(dim=(0, 1)).cpu()
            sums[index]["no_pos0"] += x[:, 1:].pow(2).sum(dim=(0, 1)).cpu()
        return record

    handles = [layer.block.register_forward_pre_hook(hook(layer.index)) for layer in layers]
    try:
        device = model.get_input_embeddings().weight.device
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size]
            model(input_ids=batch.to(device), use_cache=False)
            counts["all"] += batch.numel()
            counts["no_pos0"] += batch[:, 1:].numel()
    finally:
        for h in handles:
            h.remove()
    out = []
    for layer in layers:
        entry = {"layer": layer.index}
        for part in ("all", "no_pos0"):
            entry[part] = _channel_summary(sums[layer.index][part], counts[part])
        out.append(entry)
    return out


@contextmanager
def fake_quantized_experts(model: nn.Module, spec: QSpec, keep_columns: dict | None = None) -> Iterator[None]:
    """RTN-quantize every expert matrix (routed and shared) in place; restore the originals on exit.

    keep_columns: {(layer, expert, projection): LongTensor of input columns} kept at full
    precision (AWQ's "salient channels in FP16" check)."""
    saved = []
    with torch.no_grad():
        for layer in moe_layers(model):
            for expert, projection, weight in layer.matrices():
                original = weight.clone()
                saved.append((weight, original))
                q = quantize_rtn(weight, spec).dequantize().to(weight.dtype)
                cols = (keep_columns or {}).get((layer.index, expert, projection))
                if cols is not None and cols.numel():
                    q[:, cols] = original[:, cols]
                weight.copy_(q)
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


@torch.no_grad()
def routing_frequencies(model, windows: torch.Tensor, top_k: int, batch_size: int = 8) -> torch.Tensor:
    """[layers, experts] share of top-k selections, from the routers' logits."""
    counts = None
    for start in range(0, len(windows), batch_size):
        out = model(input_ids=windows[start:start + batch_size], output_router_logits=True, use_cache=False)
        per_layer = torch.stack([torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(),
                                                minlength=logits.shape[-1]) for logits in out.router_logits])
        counts = per_layer if counts is None else counts + per_layer
    return counts.double() / counts.sum(dim=1, keepdim=True)
