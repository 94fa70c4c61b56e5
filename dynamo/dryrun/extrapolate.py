"""From a truncated real-shape run to the full model: memory by accounting, seconds by scaling.

GPU memory is not measured here (no GPU): it is the sum of what the pipeline keeps resident,
each term computed from the exact shapes (meta-device models, ExpertGroupStats.zeros on meta).
The same accounting applied to the truncated model is checked against the dry run's measured
peak RSS (`accounting_check`), which is the evidence that no large term is missing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..adapters import moe_layers
from ..calibration.stats import ExpertGroupStats
from ..switching.base import SwitchSummary

GIB = 1024 ** 3


def _nbytes(stats: ExpertGroupStats) -> int:
    tensors = [stats.tokens, stats.router_weight_sum, stats.hessian_in, stats.hessian_mid]
    tensors += [t for unit in stats.channels.values() for t in unit.values()]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def layer_stats_nbytes(model, hessians: bool = True) -> dict:
    """Bytes of one MoE layer's calibration statistics (fp32 Hessians + channel sums), routed and shared,
    for the largest MoE layer of `model` (allocated on the meta device: nothing is materialised)."""
    best = {"routed": 0, "shared": 0, "hessian": 0}
    for layer in moe_layers(model):
        routed = ExpertGroupStats.zeros(layer.n_experts, layer.hidden_size, layer.intermediate_size, hessians, "meta")
        out = {"routed": _nbytes(routed), "shared": 0}
        hess = layer.n_experts * (layer.hidden_size ** 2 + layer.intermediate_size ** 2) * 4 if hessians else 0
        if layer.shared_expert is not None:
            s_inter = layer.shared_expert.down_proj.weight.shape[1]
            out["shared"] = _nbytes(ExpertGroupStats.zeros(1, layer.hidden_size, s_inter, hessians, "meta"))
            hess += (layer.hidden_size ** 2 + s_inter ** 2) * 4 if hessians else 0
        out["hessian"] = hess
        if out["routed"] + out["shared"] > best["routed"] + best["shared"]:
            best = out
    return {**best, "total": best["routed"] + best["shared"]}


def gptq_work_nbytes(model) -> int:
    """GPTQ's working set for its largest matrix: fp32 weight, Hessian, its inverse Cholesky, error."""
    worst = 0
    for layer in moe_layers(model):
        for out_f, in_f in ((layer.intermediate_size, layer.hidden_size), (layer.hidden_size, layer.intermediate_size)):
            worst = max(worst, 4 * (2 * out_f * in_f + 2 * in_f * in_f))
    return worst


def layer_weight_nbytes(model, bytes_per_param: int = 2) -> int:
    return max(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers) * bytes_per_param


@dataclass
class MemoryModel:
    """Resident bytes of the offline stage (analysis + GPTQ + DQS cache) on one device."""

    weights: int            # the whole model at its dtype
    one_layer_weights: int  # the largest decoder layer (offloaded path)
    outside_weights: int    # embeddings, final norm, LM head: on the GPU under offload too
    layer_stats: int        # one MoE layer's statistics (Hessians in fp32)
    moe_layers: int
    activations: int        # calibration windows' hidden states in and out of one layer
    gptq_work: int
    dqs_cache: int          # FP16 channel cache + BQ copy for the way back

    def sequential(self) -> int:
        return self.weights + self.layer_stats + self.activations + self.gptq_work + self.dqs_cache

    def one_pass(self) -> int:
        return self.weights + self.moe_layers * self.layer_stats + self.activations + self.gptq_work + self.dqs_cache

    def offloaded(self) -> int:
        """model.offload (dynamo/offload.py): the layers and the DQS cache (built from them) stay on the CPU."""
        return self.outside_weights + self.one_layer_weights + self.layer_stats + self.activations + self.gptq_work

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items()}
        out.update(sequential_nbytes=self.sequential(), one_pass_nbytes=self.one_pass(),
                   offloaded_sequential_nbytes=self.offloaded())
        out.update({k.replace("nbytes", "gib"): round(v / GIB, 2) for k, v in list(out.items()) if k.endswith("nbytes")})
        return out


def dqs_device_nbytes(switching: dict) -> int:
    """The DQS bytes a run's record (`switching`) says stay on the model's device: `resident_nbytes`, a field
    of every policy's SwitchSummary (the paper policy's channel cache and the BQ copy for the way back; the
    adaptive policy's slot budget, its master copy of the experts being on the host)."""
    return SwitchSummary.of_record(switching).resident_nbytes


def memory_model(model, *, calib_tokens: int, hidden: int, dqs_cache: int, bytes_per_param: int = 2) -> MemoryModel:
    n_moe = len(list(moe_layers(model)))
    weights = sum(p.numel() for p in model.parameters()) * bytes_per_param
    return MemoryModel(weights=weights, one_layer_weights=layer_weight_nbytes(model, bytes_per_param),
                       outside_weights=weights - sum(p.numel() for p in model.model.layers.parameters()) * bytes_per_param,
                       layer_stats=layer_stats_nbytes(model)["total"], moe_layers=n_moe,
                       activations=2 * calib_tokens * hidden * bytes_per_param,
                       gptq_work=gptq_work_nbytes(model), dqs_cache=dqs_cache)


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """This CPU's fp32 matrix-product throughput (the unit of the CPU-to-GPU ratio)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    import time

    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e9


# bytes of one candidate in dynamo.switching.adaptive.Candidates: gain f32, cost i64, layer i32, expert i32,
# proj i8, kind i8, index i32
CANDIDATE_NBYTES = 4 + 8 + 4 + 4 + 1 + 1 + 4


def switch_held_nbytes(model, budget_nbytes: int = 0) -> dict:
    """What the adaptive switch holds at once, by accounting, for the largest MoE layer of `model`: that
    layer's routed fp32 Hessians ([E, H, H] + [E, I, I]) and its candidates (at most every row and column of
    gate, up and down: 3 (H + I) per expert), one layer whatever the depth (dynamo.switching.adaptive
    profiles and scores one MoE layer at a time, `held_nbytes_by_layer`); plus the running best set, which
    grows with the slot budget only: per kind (row, column, 8-bit expert) at most KEEP x the budget / the
    shortest slot (min(H, I) one-byte codes) records of CANDIDATE_NBYTES, a few % of the budget's own bytes
    at real widths. Low-rank candidates (the default) keep their factors in fp16 in HOST memory, not on the
    device (`host_factors_bound`): the layer's (at most LOWRANK_MAX_RANK components of H + I values per matrix)
    and the running set's (KEEP x the budget's one-byte values at two bytes each)."""
    from ..switching.adaptive import KEEP, LOWRANK_MAX_RANK

    worst = {"hessians": 0, "candidates": 0}
    factors = 0
    shortest = None
    for layer in moe_layers(model):
        e, h, i = layer.n_experts, layer.hidden_size, layer.intermediate_size
        here = {"hessians": e * (h * h + i * i) * 4, "candidates": e * 3 * (h + i) * CANDIDATE_NBYTES}
        factors = max(factors, e * 3 * min(LOWRANK_MAX_RANK, h, i) * (h + i) * 2)
        shortest = min(h, i) if shortest is None else min(shortest, h, i)
        if sum(here.values()) > sum(worst.values()):
            worst = here
    best = 3 * KEEP * budget_nbytes * CANDIDATE_NBYTES // shortest if shortest else 0
    return {**worst, "best_bound": best, "total": worst["hessians"] + worst["candidates"] + best,
            "host_factors_bound": factors + 2 * KEEP * budget_nbytes}


def switch_needs(per_layer_s: dict | None, held_nbytes: int, *, moe_layers_full: int, weights: int, budget: int,
                 activations: int = 0, token_scale: float = 1.0) -> dict:
    """One adaptive switch of the full model. Memory: the model's weights, the slot budget, the switch
    sample's hidden states in and out of one layer (`activations`) and one MoE layer's held bytes (x 1, not
    x the layers: what the multi-layer dry run checks, scripts/dryrun_depth.py). Seconds, from a dry run's
    per-MoE-layer measurements (`per_layer_s`, None: not measured): the per-layer profile scaled to the
    full run's switch sample (`token_scale`), select and write, each times the MoE layers."""
    peak = weights + budget + activations + held_nbytes
    out = {"held_nbytes": held_nbytes, "held_gib": round(held_nbytes / GIB, 2), "peak_nbytes": peak,
           "peak_gib": round(peak / GIB, 2)}
    if per_layer_s is not None:
        parts = {"profile_s": per_layer_s["profile_s"] * token_scale * moe_layers_full,
                 "select_s": per_layer_s["select_s"] * moe_layers_full,
                 "write_s": per_layer_s["write_s"] * moe_layers_full}
        out.update({k: round(v, 1) for k, v in parts.items()}, seconds=round(sum(parts.values()), 1))
    return out


def switch_select_flops(model) -> int:
    """Floating-point operations of the Hessian scoring of one switch over every MoE layer of `model`: per
    routed expert d @ H for gate and up ([I, H] @ [H, H]) and down ([H, I] @ [I, I]), whatever the sample's
    tokens; the profile's work grows with the tokens instead."""
    return sum(layer.n_experts * 2 * (2 * layer.intermediate_size * layer.hidden_size ** 2
                                      + layer.hidden_size * layer.intermediate_size ** 2) for layer in moe_layers(model))
