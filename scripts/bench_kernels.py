"""Fused dequantize + matmul kernel speed against the FP16 torch matmul, on MoE expert projections.

    python scripts/bench_kernels.py [--bits 2 3 4 6 8] [--batches 1 4 16 64] [--rep-ms 100]
    python scripts/bench_kernels.py --check     # a tiny correctness pass; runs on CPU too

Shapes: the expert projections of OLMoE-1B-7B (hidden 2048, expert intermediate 1024),
Qwen1.5-MoE-A2.7B and DeepSeek-MoE-16B (2048, 1408): gate and up are [I, H], down is [H, I].
Weights are RTN-quantized random matrices (group 128, asymmetric; speed does not depend on the
values), activations fp16. Kernels are timed by `triton.testing.do_bench`: each call alone with
CUDA events after the L2 cache is flushed (a 256 MiB buffer zeroed), so weights come from device
memory as in a decode step; the median over the calls that fit in --rep-ms is kept. Decoding is
timed end to end (wall clock around `generate`, which is host-bound).
Bandwidth counts the bytes a call must move (weights with their scales and zeros, activations,
outputs) and is compared with the bandwidth of a 1 GiB device-to-device copy measured in the
same run (read + write bytes). Every fused result is checked against the torch reference first.

Two more parts (--parts): "moe", a whole routed-expert layer of each model (its expert count and
top-k, experts at mixed widths 2/3/4 cycled, about 3.0 code bits on average as a DynaMo 3-bit
budget gives) through the grouped kernels, against transformers' own FP16 experts module with
each of its implementations (eager, batched_mm, grouped_mm; the fastest is the baseline); and
"decode", end-to-end greedy decoding tokens/s of an OLMoE-1B-7B-shaped model (random weights,
the real configuration), FP16 against the same model packed at those mixed widths
(dynamo.packed.model.attach_packed), batch 1 and 4.

Writes results/benchmarks/kernels-<device-name>.json. Needs a CUDA device: without one it says
so and writes nothing. --check compares every kernel with its reference on small shapes (on CPU
under TRITON_INTERPRET=1, which it sets itself), decodes a few tokens with a tiny packed model
against its fake-quantized twin, and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from dynamo.config import REPO_ROOT

MODELS = {"olmoe-1b-7b": (2048, 1024), "qwen1.5-moe-a2.7b": (2048, 1408), "deepseek-moe-16b": (2048, 1408)}
MOE_LAYERS = {"olmoe-1b-7b": (64, 8), "qwen1.5-moe-a2.7b": (60, 4), "deepseek-moe-16b": (64, 6)}  # experts, top-k
# OLMoE-1B-7B's configuration (its config.json); weights are random: decode speed does not depend on them
DECODE_CONFIG = dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                     max_position_embeddings=4096)
TINY_CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, num_experts=6, num_experts_per_tok=2, max_position_embeddings=64)
MIXED_WIDTHS = (2, 3, 4)  # cycled over the experts: about 3.0 average code bits
FP16_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
PARTS = ("kernels", "moe", "decode")
BITS = (2, 3, 4, 6, 8)
BATCHES = (1, 4, 16, 64)
GROUP_SIZE = 128
COPY_BYTES = 1 << 30
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2}
NO_CUDA = ("bench_kernels: a CUDA device is needed for speed numbers and none was found; nothing written "
           "(--check runs a correctness pass on CPU)")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def check(device: torch.device) -> int:
    """Each kernel against its reference on small odd shapes; 0 when all agree."""
    from dynamo.packed.weight import pack_weight
    from dynamo.quant import QSpec, quantize_rtn
    from dynamo_kernels.dispatch import moe_experts
    from dynamo_kernels.experts import PackedExperts
    from dynamo_kernels.packing import PackedWeight
    from dynamo_kernels.reference import dequant_matmul_ref, moe_experts_ref
    from dynamo_kernels.triton_matmul import dequant_matmul_triton

    gen = torch.Generator().manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    def packed(rows: int, cols: int, bits: int) -> PackedWeight:
        w = torch.randn(rows, cols, generator=gen) / cols ** 0.5
        return pack_weight(quantize_rtn(w, QSpec(bits, group_size=32))).to(device)

    failures = 0
    for bits in BITS:
        w = packed(40, 101, bits)
        x = torch.randn(3, 101, generator=gen).to(device, dtype)
        err = rel_err(dequant_matmul_triton(x, w), dequant_matmul_ref(x, w))
        failures += err > TOLERANCE[dtype]
        print(f"int{bits} matmul  [3, 101] x [40, 101]^T: max rel err {err:.2e}")
    widths = list(BITS)
    experts = PackedExperts.build([packed(40, 48, b) for b in widths], [packed(40, 48, b) for b in widths],
                                  [packed(48, 40, b) for b in widths], F.silu)
    index = torch.stack([torch.randperm(len(widths), generator=gen)[:2] for _ in range(6)]).to(device)
    weights = torch.rand(6, 2, generator=gen).to(device)
    hidden = torch.randn(6, 48, generator=gen).to(device, dtype)
    err = rel_err(moe_experts(experts, hidden, index, weights, backend="triton"),
                  moe_experts_ref(experts, hidden, index, weights))
    failures += err > TOLERANCE[dtype]
    print(f"MoE layer, {len(widths)} experts of widths {widths}, top-2: max rel err {err:.2e}")
    err = check_decode(device, dtype)
    failures += err > TOLERANCE[dtype]
    print(f"decode: tiny packed model (widths {list(MIXED_WIDTHS)}) against its fake-quantized twin: "
          f"max rel err {err:.2e}")
    print("check: all kernels match their references" if not failures else f"check: {failures} mismatches")
    return 1 if failures else 0


def median_ms(fn: Callable[[], object], args: argparse.Namespace) -> float:
    """Median ms of one call (triton.testing.do_bench: CUDA events, the L2 cache flushed before each call).

    do_bench needs a GPU driver (without one, even under TRITON_INTERPRET=1, triton reports
    "0 active drivers"); this script only times on CUDA, so it needs no CPU timer."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")


def l2_flush_bytes() -> int:
    """The buffer do_bench zeroes before each timed call."""
    import triton

    cache = triton.runtime.driver.active.get_empty_cache_for_benchmark()
    return cache.numel() * cache.element_size()


def copy_bandwidth_gbps(device: torch.device, args: argparse.Namespace) -> float:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), args)
    return 2 * COPY_BYTES / (ms * 1e-3) / 1e9


def bench_projections(device: torch.device, args: argparse.Namespace, copy_gbps: float) -> list[dict]:
    """One expert projection: the fused kernel at each width against F.linear in FP16."""
    from dynamo.packed.weight import pack_weight
    from dynamo.quant import QSpec, quantize_rtn
    from dynamo_kernels.reference import dequant_matmul_ref
    from dynamo_kernels.triton_matmul import dequant_matmul_triton

    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for model in args.models:
        hidden, inter = MODELS[model]
        for projection, (n, k) in (("gate/up", (inter, hidden)), ("down", (hidden, inter))):
            dense = torch.randn(n, k, generator=gen, device=device) / k ** 0.5
            w16 = dense.half()
            packed = {b: pack_weight(quantize_rtn(dense, QSpec(b, group_size=GROUP_SIZE)))
                      for b in args.bits}
            for batch in args.batches:
                x = torch.randn(batch, k, generator=gen, device=device).half()
                io_bytes = 2 * batch * (k + n)
                fp16_ms = median_ms(partial(F.linear, x, w16), args)
                fp16_bytes = w16.numel() * 2 + io_bytes
                for bits, w in packed.items():
                    err = rel_err(dequant_matmul_triton(x, w), dequant_matmul_ref(x, w))
                    if err > TOLERANCE[torch.float16]:
                        raise SystemExit(f"bench_kernels: int{bits} {model} {projection} batch {batch}: fused "
                                         f"kernel disagrees with the reference (max rel err {err:.2e}); not timing it")
                    out = torch.empty(batch, n, dtype=torch.float16, device=device)
                    fused_ms = median_ms(partial(dequant_matmul_triton, x, w, out=out), args)
                    fused_bytes = w.nbytes + io_bytes
                    row = {"model": model, "projection": projection, "shape": [n, k], "bits": bits, "batch": batch,
                           "fused_ms": fused_ms, "fp16_ms": fp16_ms, "speedup": fp16_ms / fused_ms,
                           "bytes_ratio": fp16_bytes / fused_bytes,
                           "fused_gbps": fused_bytes / (fused_ms * 1e-3) / 1e9,
                           "fp16_gbps": fp16_bytes / (fp16_ms * 1e-3) / 1e9, "max_rel_err": err}
                    row["fused_of_copy_bw"] = row["fused_gbps"] / copy_gbps
                    row["fp16_of_copy_bw"] = row["fp16_gbps"] / copy_gbps
                    rows.append(row)
                    print(f"{model:18s} {projection:7s} int{bits} batch {batch:2d}: fused {fused_ms * 1e3:7.1f} us, "
                          f"fp16 {fp16_ms * 1e3:7.1f} us, x{row['speedup']:.2f} (bytes x{row['bytes_ratio']:.2f}), "
                          f"{row['fused_of_copy_bw']:.0%} of copy bandwidth")
    return rows


def summary(report: dict) -> dict:
    """The issue's target, read off the rows: >= 3x over FP16 at ~3 bits and batch 1."""
    out = {"target": ">= 3x over FP16 at ~3 average bits, batch 1; >= 80% of the bandwidth roofline (16 / bits)"}
    three = [r for r in report.get("results", []) if r["bits"] == 3 and r["batch"] == 1]
    if three:
        out["projection_int3_batch1_speedup"] = {f"{r['model']} {r['projection']}": r["speedup"] for r in three}
        out["projection_int3_batch1_of_roofline"] = {f"{r['model']} {r['projection']}": r["speedup"] / r["bytes_ratio"]
                                                     for r in three}
    layers = [r for r in report.get("moe_layers", []) if r["batch"] == 1]
    if layers:
        out["moe_layer_mixed_batch1_speedup"] = {r["model"]: r["speedup"] for r in layers}
    if "decode" in report:
        out["decode_speedup"] = report["decode"]["speedup"]
    return out


def bench(device: torch.device, args: argparse.Namespace) -> dict:
    from dynamo.records import git_state, package_versions

    props = torch.cuda.get_device_properties(device)
    copy_gbps = copy_bandwidth_gbps(device, args)
    print(f"{props.name}: device-to-device copy {copy_gbps:.0f} GB/s")
    report = {"schema": "kernel-benchmark", "schema_version": 3,
              "device": {"name": props.name, "capability": f"{props.major}.{props.minor}",
                         "multiprocessors": props.multi_processor_count, "memory_bytes": props.total_memory},
              "versions": package_versions(), "git": git_state(),
              "settings": {"group_size": GROUP_SIZE, "sym": False, "activations": "fp16",
                           "timer": "triton.testing.do_bench", "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
                           "statistic": "median", "l2_flush_bytes": l2_flush_bytes(),
                           "copy_bytes": COPY_BYTES, "copy_bandwidth_counts": "read + write",
                           "bytes_counted": "weights (+ scales and zeros) + activations + outputs"},
              "copy_bandwidth_gbps": copy_gbps, "parts": list(args.parts)}
    if "kernels" in args.parts:
        report["results"] = bench_projections(device, args, copy_gbps)
    if "moe" in args.parts:
        report["moe_layers"] = bench_moe_layers(device, args)
    if "decode" in args.parts:
        torch.cuda.empty_cache()
        report["decode"] = bench_decode(device, args)
    report["summary"] = summary(report)
    return report


def mixed_widths(n_experts: int) -> list[int]:
    return [MIXED_WIDTHS[e % len(MIXED_WIDTHS)] for e in range(n_experts)]


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
    from dynamo.packed.weight import pack_weight
    from dynamo.quant import QSpec, quantize_rtn
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


def decode_model(config: dict, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, OlmoeConfig

    torch.manual_seed(0)
    cfg = OlmoeConfig(**config, pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


def quantize_mixed(model) -> dict:
    """RTN at mixed widths (expert e of every layer at MIXED_WIDTHS[e % 3], group 128), packed per layer."""
    from dynamo.adapters import moe_layers
    from dynamo.quant import QSpec, QuantPlan, apply_plan
    from dynamo.packed.model import pack_experts

    plan = QuantPlan(method="rtn", default=QSpec(MIXED_WIDTHS[0], group_size=GROUP_SIZE))
    for layer in moe_layers(model):
        for expert, bits in enumerate(mixed_widths(layer.n_experts)):
            plan.set_expert_bits(layer.index, expert, bits)
    return pack_experts(model, apply_plan(model, plan, keep_codes=True).codes)


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


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


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
    from dynamo.packed.model import attach_packed

    attach_packed(model, quantize_mixed(model))
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


def check_decode(device: torch.device, dtype: torch.dtype) -> float:
    """A tiny packed model against its fake-quantized twin (max rel err of the logits); decodes a few tokens."""
    import copy

    from dynamo.packed.model import attach_packed, write_dequantized

    model = decode_model(TINY_CONFIG, dtype, device)
    packed = quantize_mixed(model)
    write_dequantized(model, packed)  # the twin holds exactly the packed values (fp16 scales)
    reference = copy.deepcopy(model)
    attach_packed(model, packed)
    ids = torch.randint(1, TINY_CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        err = rel_err(model(ids).logits, reference(ids).logits)
    model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    return err

def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="correctness pass only (CPU or GPU), writes nothing")
    parser.add_argument("--bits", type=int, nargs="+", default=list(BITS), choices=BITS)
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--warmup-ms", type=float, default=25, help="do_bench's warm-up time per timed call")
    parser.add_argument("--rep-ms", type=float, default=100, help="do_bench's timing budget per timed call")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--new-tokens", type=int, default=64, help="decode: tokens generated per run")
    parser.add_argument("--decode-reps", type=int, default=5)
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "results" / "benchmarks")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.check:
        if not cuda:  # must precede the first import of triton (kernels are imported inside check)
            os.environ["TRITON_INTERPRET"] = "1"
        sys.exit(check(torch.device("cuda" if cuda else "cpu")))
    if not cuda:
        sys.exit(NO_CUDA)
    from dynamo.records import write_json_atomic

    device = torch.device("cuda")
    report = bench(device, args)
    path = args.out_dir / f"kernels-{device_slug(report['device']['name'])}.json"
    write_json_atomic(path, report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
