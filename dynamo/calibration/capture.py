"""Routed calibration capture: one streaming pass, statistics per (layer, expert).

Each expert sees exactly the tokens the router sends it (the hooks sit where the model's
own experts run, after routing), so per-expert Hessians and channel statistics come from
routed tokens only. Nothing is stored per token: every batch is folded into running sums.

Two modes:
- `capture(model, windows)`: the whole model, one pass over the windows.
- `capture_sequential(model, windows, on_layer)`: decoder layer by decoder layer, each
  fed the previous layer's outputs *after* `on_layer` ran (GPTQ's sequential order: a
  quantizer in `on_layer` sees inputs produced by already-quantized layers). Only one
  layer's activations are alive at a time, and under model.offload only one layer's weights
  are on the GPU (dynamo/offload.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import MoELayer, expert_compute, moe_layers
from ..adapters.base import adapter_for, get_path
from ..errors import UserError
from ..offload import resident, statistics_device
from .stats import CalibrationStats, ExpertGroupStats, LayerStats

log = logging.getLogger(__name__)
POLICIES = ("warn", "rtn_fallback", "route_all")


def _swiglu(g: torch.Tensor, u: torch.Tensor, act, down: torch.Tensor) -> dict:
    """Pre-activation gate/up outputs, the neuron h = act(g) * u, and the down output."""
    h = act(g) * u
    return {"gate": g, "up": u, "neuron": h, "down": h @ down.T}


def mlp_outputs(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act, x: torch.Tensor) -> dict:
    """A SwiGLU expert on x [m, H]."""
    return _swiglu(x @ gate.T, x @ up.T, act, down)


def _expert_outputs(layer: MoELayer, e: int, x: torch.Tensor) -> dict:
    if layer.adapter.storage == "fused_3d":  # gate and up in one matrix product, as the model does
        g, u = (x @ layer.experts.gate_up_proj.data[e].T).chunk(2, dim=-1)
        return _swiglu(g, u, layer.activation(), layer.weight(e, "down"))
    return mlp_outputs(layer.weight(e, "gate"), layer.weight(e, "up"), layer.weight(e, "down"), layer.activation(), x)


ExpertOutputs = Callable[[MoELayer, int, torch.Tensor], dict]


@dataclass
class _State:
    hessians: bool
    router_weighted: bool
    expert_outputs: ExpertOutputs = _expert_outputs
    statistics: tuple[str, ...] = ()  # registered channel statistics beyond CHANNEL_STATS (a metric's)
    stats: dict[int, LayerStats] = field(default_factory=dict)
    route_all: dict[int, list[int]] = field(default_factory=dict)   # layer -> experts seeing every token
    route_all_stats: dict[int, ExpertGroupStats] = field(default_factory=dict)

    def new_layer(self, layer: MoELayer, device) -> None:
        inter, hidden = layer.intermediate_size, layer.hidden_size
        shared = None
        if layer.shared_expert is not None:
            s_inter = layer.shared_expert.down_proj.weight.shape[1]
            shared = ExpertGroupStats.zeros(1, hidden, s_inter, self.hessians, device, extra=self.statistics)
        self.stats[layer.index] = LayerStats(layer.index, ExpertGroupStats.zeros(
            layer.n_experts, hidden, inter, self.hessians, device, extra=self.statistics), shared)

    def routed(self, layer: MoELayer, hidden: torch.Tensor, top_k_index: torch.Tensor,
               top_k_weights: torch.Tensor) -> torch.Tensor:
        """Drop-in for the model's routed experts: same output, statistics on the side."""
        out = torch.zeros_like(hidden)
        acc = self.stats[layer.index].routed
        with torch.no_grad():
            for e in top_k_index.unique().tolist():
                if not 0 <= e < layer.n_experts:  # padding slots (expert-parallel layouts)
                    continue
                token, slot = torch.where(top_k_index == e)
                x, r = hidden[token], top_k_weights[token, slot]
                outputs = self.expert_outputs(layer, e, x)
                out.index_add_(0, token, (outputs["down"] * r[:, None]).to(out.dtype))
                acc.add(e, x, r, outputs, r if self.router_weighted else None)
            for e in self.route_all.get(layer.index, []):
                # Every token of the batch, for statistics only; the model's output stays routed.
                ones = torch.ones(hidden.shape[0], dtype=hidden.dtype, device=hidden.device)
                self.route_all_stats[layer.index].add(e, hidden, ones, self.expert_outputs(layer, e, hidden), None,
                                                      count_tokens=False)
        return out

    def shared_hook(self, layer: MoELayer):
        def hook(module: nn.Module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])
            with torch.no_grad():
                gate = layer.shared_expert_gate
                r = (torch.sigmoid(gate(x)).squeeze(-1) if gate is not None
                     else torch.ones(x.shape[0], dtype=x.dtype, device=x.device))
                outputs = mlp_outputs(module.gate_proj.weight, module.up_proj.weight, module.down_proj.weight,
                                      module.act_fn, x)
                self.stats[layer.index].shared.add(0, x, r, outputs, r if self.router_weighted else None)
        return hook


def _check_windows(windows: torch.Tensor) -> None:
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise UserError(f"calibration needs a [windows, seqlen] tensor of token ids, got {tuple(windows.shape)}")


def _apply_policy(state: _State, layers: list[MoELayer], min_tokens: int, policy: str,
                  rerun: Callable[[], None]) -> tuple[list, list]:
    """Returns (route_all experts, rtn_fallback experts) after acting on under-covered experts."""
    if policy not in POLICIES:
        raise UserError(f"unknown calib.policy '{policy}'; choose one of {', '.join(POLICIES)}")
    low = [(layer.index, e) for layer in layers for e, n in enumerate(state.stats[layer.index].routed.tokens.tolist())
           if n < min_tokens]
    if not low:
        return [], []
    log.warning("%d expert(s) saw fewer than %d calibration tokens (policy %s): %s", len(low), min_tokens, policy,
                ", ".join(f"L{i}.E{e}" for i, e in low[:20]) + (" ..." if len(low) > 20 else ""))
    if policy == "rtn_fallback":
        return [], low
    if policy == "route_all":
        device = next(iter(state.stats.values())).routed.tokens.device
        for layer in layers:
            experts = [e for i, e in low if i == layer.index]
            if experts:
                state.route_all[layer.index] = experts
                state.route_all_stats[layer.index] = ExpertGroupStats.zeros(
                    layer.n_experts, layer.hidden_size, layer.intermediate_size, state.hessians, device,
                    extra=state.statistics)
        saved = {layer.index: state.stats[layer.index] for layer in layers}
        # The extra pass must not count routed tokens twice: it accumulates into throw-away stats.
        for layer in layers:
            state.new_layer(layer, device)
        rerun()
        for i, kept in saved.items():
            state.stats[i] = kept
            for e in state.route_all.get(i, []):
                kept.routed.replace(e, state.route_all_stats[i])
        state.route_all.clear()
        return low, []
    return [], []


def _batches(windows: torch.Tensor, batch_size: int, desc: str):
    starts = range(0, len(windows), batch_size)
    return tqdm(starts, desc=desc, leave=False, disable=len(starts) < 2)


@torch.no_grad()
def capture(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8, hessians: bool = True,
            hessian_weighting: str = "none", min_tokens: int = 0, policy: str = "warn",
            expert_outputs: ExpertOutputs | None = None, statistics: tuple[str, ...] = ()) -> CalibrationStats:
    """One pass over `windows` [N, T]; statistics of every MoE layer (and the registered channel
    `statistics` a metric asks for, dynamo.analysis.significance.statistics_for).

    `expert_outputs(layer, e, x)` -> {"gate", "up", "neuron", "down"}: how an expert's outputs are
    computed; default from the model's dense expert weights (a packed model passes its own).
    """
    _check_windows(windows)
    state = _State(hessians=hessians, router_weighted=hessian_weighting == "router",
                   expert_outputs=expert_outputs or _expert_outputs, statistics=tuple(statistics))
    layers = list(moe_layers(model))
    device = model.get_input_embeddings().weight.device
    for layer in layers:
        state.new_layer(layer, statistics_device(model, layer.router))

    def run_all() -> None:
        hooks = [layer.shared_expert.register_forward_hook(state.shared_hook(layer))
                 for layer in layers if layer.shared_expert is not None]
        try:
            with expert_compute(model, state.routed):
                for start in _batches(windows, batch_size, "calibration"):
                    model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()

    run_all()
    route_all, fallback = _apply_policy(state, layers, min_tokens, policy, run_all)
    return CalibrationStats(layers=state.stats, windows=len(windows), seqlen=windows.shape[1],
                            hessian_weighting=hessian_weighting, route_all=route_all, rtn_fallback=fallback,
                            min_tokens=min_tokens)


class _Stop(Exception):
    pass


def _layer_output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


@torch.no_grad()
def capture_sequential(model: nn.Module, windows: torch.Tensor,
                       on_layer: Callable[[int, LayerStats | None], bool] | None = None, *, batch_size: int = 8,
                       hessians: bool = True, hessian_weighting: str = "none", min_tokens: int = 0,
                       policy: str = "warn", keep_hessians: bool = True,
                       expert_outputs: ExpertOutputs | None = None) -> CalibrationStats:
    """Decoder layer by decoder layer. `on_layer(index, stats)` runs after each layer's capture
    (stats is None for dense layers) and returns True if it changed that layer's weights, in
    which case the layer is re-run so the next layer sees its new outputs.
    keep_hessians=False drops each layer's Hessians once `on_layer` has used them, so only one
    layer's are alive at a time (at real shapes they are GBs per layer: 48 x 2.4 GB for
    Qwen3-30B-A3B); tokens and channel statistics are kept for the coverage report.
    `expert_outputs`: as in `capture` (a packed model passes its own)."""
    _check_windows(windows)
    adapter = adapter_for(model)
    decoder = get_path(model, adapter.layers)
    moe = {layer.index: layer for layer in moe_layers(model, adapter)}
    device = model.get_input_embeddings().weight.device

    inputs: list[tuple[torch.Tensor, dict]] = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append((hidden, kwargs))
        raise _Stop

    handle = decoder[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in _batches(windows, batch_size, "layer inputs"):
            try:
                model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()

    state = _State(hessians=hessians, router_weighted=hessian_weighting == "router",
                   expert_outputs=expert_outputs or _expert_outputs)
    all_route_all, all_fallback = [], []
    for index, block in enumerate(tqdm(decoder, desc="layers", leave=False)):
        layer = moe.get(index)
        outputs: list[torch.Tensor] = []

        def run_layer(keep: bool) -> None:
            hooks = ([layer.shared_expert.register_forward_hook(state.shared_hook(layer))]
                     if layer is not None and layer.shared_expert is not None else [])
            try:
                with expert_compute(model, state.routed):
                    for hidden, kwargs in inputs:
                        out = _layer_output(block(hidden, **kwargs))
                        if keep:
                            outputs.append(out)
            finally:
                for h in hooks:
                    h.remove()

        with resident(model, block):  # model.offload: the layer stays on the GPU for its whole step
            if layer is not None:
                state.new_layer(layer, statistics_device(model, layer.router))
            run_layer(keep=True)
            if layer is not None:
                ra, fb = _apply_policy(state, [layer], min_tokens, policy, lambda: run_layer(keep=False))
                all_route_all += ra
                all_fallback += fb
            changed = on_layer(index, state.stats.get(index)) if on_layer else False
            if layer is not None and not keep_hessians:
                for group in (state.stats[index].routed, state.stats[index].shared):
                    if group is not None:
                        group.hessian_in = group.hessian_mid = None
            if changed:
                outputs.clear()
                if layer is not None:  # the re-run must not add to the statistics handed out
                    saved = state.stats[index]
                    state.new_layer(layer, statistics_device(model, layer.router))
                run_layer(keep=True)
                if layer is not None:
                    state.stats[index] = saved
        inputs = [(out, kwargs) for out, (_, kwargs) in zip(outputs, inputs)]
    return CalibrationStats(layers=state.stats, windows=len(windows), seqlen=windows.shape[1],
                            hessian_weighting=hessian_weighting, route_all=all_route_all, rtn_fallback=all_fallback,
                            min_tokens=min_tokens)
