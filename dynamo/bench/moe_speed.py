"""A whole routed-expert layer (grouped kernels at mixed widths against transformers' FP16 experts) and
end-to-end greedy decoding of an OLMoE-1B-7B-shaped model, FP16 against packed (CUDA only)."""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from .common import GROUP_SIZE, MIXED_WIDTHS, TOLERANCE, mixed_widths, pack_mixed, param_bytes, rel_err
from .kernel_check import decode_model
from .kernel_speed import MODELS, median_ms

MOE_LAYERS = {"olmoe-1b-7b": (64, 8), "qwen1.5-moe-a2.7b": (60, 4), "deepseek-moe-16b": (64, 6)}  # experts, top-k
# OLMoE-1B-7B's configuration (its config.json); weights are random: decode speed does not depend on them
DECODE_CONFIG = dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                     max_position_embeddings=4096)
FP16_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def fp16_experts(hidden: int, inter: int, n_experts: int, device: torch.device, gen: torch.Generator):
    """transformers' fused FP16 experts module (OLMoE's class; only the shapes matter), random weights."""
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

    config = OlmoeConfig(hidden_size=hidden, intermediate_size=inter, num_experts=n_experts)
    experts = OlmoeExperts(config).to(device, torch.float16)
    with torch.no_grad():
        for param, fan_in in ((experts.gate_up_proj, hidden), (experts.down_proj, inter)):
            param.copy_(torch.randn(param.shape, generator=gen, device=device) / fan_in ** 0.5)
    return experts, config


def pack_fused(experts, widths: list[int]):
    """PackedExperts from a fused experts module, expert e RTN-quantized at widths[e] (group 128)."""
    from ..packed.weight import pack_weight
    from ..quant import QSpec, quantize_rtn
    from dynamo_kernels.experts import PackedExperts
    from dynamo_kernels.packing import PackedWeight

    inter = experts.down_proj.shape[2]

    def packed(w: torch.Tensor, bits: int) -> PackedWeight:
        return pack_weight(quantize_rtn(w.detach().float(), QSpec(bits, group_size=GROUP_SIZE)))

    gate = [packed(experts.gate_up_proj[e, :inter], b) for e, b in enumerate(widths)]
    up = [packed(experts.gate_up_proj[e, inter:], b) for e, b in enumerate(widths)]
    down = [packed(experts.down_proj[e], b) for e, b in enumerate(widths)]
    return PackedExperts.build(gate, up, down, experts.act_fn)


def bench_moe_layers(device: torch.device, args: argparse.Namespace) -> list[dict]:
    """A whole routed-expert layer: grouped kernels at mixed widths against transformers' FP16 experts."""
    from dynamo_kernels.dispatch import moe_experts
    from dynamo_kernels.reference import moe_experts_ref

    gen = torch.Generator(device=device).manual_seed(1)
    rows = []
    for model in args.models:
        (hidden, inter), (n_experts, top_k) = MODELS[model], MOE_LAYERS[model]
        experts, config = fp16_experts(hidden, inter, n_experts, device, gen)
        widths = mixed_widths(n_experts)
        packed = pack_fused(experts, widths)
        for batch in args.batches:
            x = torch.randn(batch, hidden, generator=gen, device=device).half()
            index = torch.stack([torch.randperm(n_experts, generator=gen, device=device)[:top_k] for _ in range(batch)])
            weights = torch.rand(batch, top_k, generator=gen, device=device).softmax(-1).half()
            got = moe_experts(packed, x, index, weights, backend="triton")
            err = rel_err(got, moe_experts_ref(packed, x, index, weights))
            if err > TOLERANCE[torch.float16]:
                raise SystemExit(f"bench_kernels: {model} MoE layer batch {batch}: grouped kernels disagree with the "
                                 f"reference (max rel err {err:.2e}); not timing them")
            fp16 = {}
            for impl in FP16_IMPLEMENTATIONS:
                config._experts_implementation = impl
                try:
                    fp16[impl] = median_ms(partial(experts, x, index, weights), args)
                except (RuntimeError, NotImplementedError) as error:  # an implementation this GPU/torch lacks
                    fp16[impl] = f"failed: {str(error).splitlines()[0][:200]}"
            timed = {k: v for k, v in fp16.items() if isinstance(v, float)}
            baseline = min(timed, key=timed.get)
            packed_ms = median_ms(partial(moe_experts, packed, x, index, weights, backend="triton"), args)
            active = index.unique().tolist()
            rows.append({"model": model, "experts": n_experts, "top_k": top_k, "batch": batch,
                         "active_experts": len(active), "avg_code_bits": sum(widths) / n_experts,
                         "packed_ms": packed_ms, "fp16_ms": fp16, "fp16_baseline": baseline,
                         "speedup": timed[baseline] / packed_ms, "max_rel_err": err,
                         "active_bytes_fp16": len(active) * 3 * hidden * inter * 2,
                         "active_bytes_packed": sum(packed.weight(e, p).nbytes for e in active
                                                    for p in ("gate", "up", "down"))})
            print(f"{model:18s} MoE layer batch {batch:2d}: packed {packed_ms * 1e3:7.1f} us, fp16 ({baseline}) "
                  f"{timed[baseline] * 1e3:7.1f} us, x{rows[-1]['speedup']:.2f}")
        del experts, packed
        torch.cuda.empty_cache()
    return rows


def decode_tokens_per_s(model, batch: int, new_tokens: int, reps: int, device: torch.device) -> float:
    prompt = torch.randint(1, model.config.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(batch))
    prompt = prompt.to(device)
    run = partial(model.generate, prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    run()  # warm-up: kernel compilation, allocator
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch * new_tokens / statistics.median(times)


def bench_decode(device: torch.device, args: argparse.Namespace) -> dict:
    """Greedy decoding of an OLMoE-1B-7B-shaped model, FP16 against packed at mixed widths."""
    model = decode_model(DECODE_CONFIG, torch.float16, device)
    batches = (1, 4)
    by_impl = {}
    for impl in FP16_IMPLEMENTATIONS:  # the FP16 baseline is transformers' fastest experts implementation
        model.set_experts_implementation(impl)
        by_impl[impl] = {b: decode_tokens_per_s(model, b, args.new_tokens, args.decode_reps, device) for b in batches}
    fp16 = {b: max(by_impl[impl][b] for impl in by_impl) for b in batches}
    fp16_bytes = param_bytes(model)
    from ..packed.model import attach_packed

    attach_packed(model, pack_mixed(model)[0])
    torch.cuda.empty_cache()
    packed = {b: decode_tokens_per_s(model, b, args.new_tokens, args.decode_reps, device) for b in batches}
    for b in batches:
        print(f"decode olmoe-1b-7b batch {b}: fp16 {fp16[b]:.1f} tok/s, packed {packed[b]:.1f} tok/s, "
              f"x{packed[b] / fp16[b]:.2f}")
    return {"model": "olmoe-1b-7b (random weights)", "config": DECODE_CONFIG, "widths": list(MIXED_WIDTHS),
            "new_tokens": args.new_tokens, "prompt_tokens": 16, "reps": args.decode_reps, "statistic": "median",
            "fp16_tokens_per_s": fp16, "fp16_tokens_per_s_by_implementation": by_impl, "packed_tokens_per_s": packed,
            "speedup": {b: packed[b] / fp16[b] for b in batches},
            "fp16_param_bytes": fp16_bytes, "packed_param_bytes": param_bytes(model)}
