"""Fused dequantize + matmul kernel speed against the FP16 torch matmul, on MoE expert projections.

    python scripts/bench_kernels.py [--bits 2 3 4 6 8] [--batches 1 4 16 64] [--reps 100]
    python scripts/bench_kernels.py --check     # a tiny correctness pass; runs on CPU too

Shapes: the expert projections of OLMoE-1B-7B (hidden 2048, expert intermediate 1024),
Qwen1.5-MoE-A2.7B and DeepSeek-MoE-16B (2048, 1408): gate and up are [I, H], down is [H, I].
Weights are RTN-quantized random matrices (group 128, asymmetric; speed does not depend on the
values), activations fp16. Each call is timed alone with CUDA events after the L2 cache is
flushed, so weights come from device memory as in a decode step; the median over --reps is kept.
Bandwidth counts the bytes a call must move (weights with their scales and zeros, activations,
outputs) and is compared with the bandwidth of a 1 GiB device-to-device copy measured in the
same run (read + write bytes). Every fused result is checked against the torch reference first.

Writes results/benchmarks/kernels-<device-name>.json. Needs a CUDA device: without one it says
so and writes nothing. --check compares every kernel with its reference on small shapes (on CPU
under TRITON_INTERPRET=1, which it sets itself) and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {"olmoe-1b-7b": (2048, 1024), "qwen1.5-moe-a2.7b": (2048, 1408), "deepseek-moe-16b": (2048, 1408)}
BITS = (2, 3, 4, 6, 8)
BATCHES = (1, 4, 16, 64)
GROUP_SIZE = 128
COPY_BYTES = 1 << 30
L2_FLUSH_BYTES = 256 << 20  # larger than the L2 of any current GPU (H100/H200: 50/60 MiB)
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2}
NO_CUDA = ("bench_kernels: a CUDA device is needed for speed numbers and none was found; nothing written "
           "(--check runs a correctness pass on CPU)")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def check(device: torch.device) -> int:
    """Each kernel against its reference on small odd shapes; 0 when all agree."""
    from dynamo.quant import QSpec, quantize_rtn
    from kernels.dispatch import moe_experts
    from kernels.experts import PackedExperts
    from kernels.packing import PackedWeight
    from kernels.reference import dequant_matmul_ref, moe_experts_ref
    from kernels.triton_matmul import dequant_matmul_triton

    gen = torch.Generator().manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    def packed(rows: int, cols: int, bits: int) -> PackedWeight:
        w = torch.randn(rows, cols, generator=gen) / cols ** 0.5
        return PackedWeight.from_quantized(quantize_rtn(w, QSpec(bits, group_size=32))).to(device)

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
    print("check: all kernels match their references" if not failures else f"check: {failures} mismatches")
    return 1 if failures else 0


def median_ms(fn, flush: torch.Tensor, warmup: int, reps: int) -> float:
    """Median time of one call, each timed alone with CUDA events after evicting the L2 cache."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def copy_bandwidth_gbps(device: torch.device, reps: int) -> float:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), torch.empty(0, device=device), warmup=3, reps=reps)
    return 2 * COPY_BYTES / (ms * 1e-3) / 1e9


def bench(device: torch.device, args: argparse.Namespace) -> dict:
    from dynamo.quant import QSpec, quantize_rtn
    from dynamo.records import git_state, package_versions
    from kernels.packing import PackedWeight
    from kernels.reference import dequant_matmul_ref
    from kernels.triton_matmul import dequant_matmul_triton

    props = torch.cuda.get_device_properties(device)
    copy_gbps = copy_bandwidth_gbps(device, reps=20)
    print(f"{props.name}: device-to-device copy {copy_gbps:.0f} GB/s")
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for model in args.models:
        hidden, inter = MODELS[model]
        for projection, (n, k) in (("gate/up", (inter, hidden)), ("down", (hidden, inter))):
            dense = torch.randn(n, k, generator=gen, device=device) / k ** 0.5
            w16 = dense.half()
            packed = {b: PackedWeight.from_quantized(quantize_rtn(dense, QSpec(b, group_size=GROUP_SIZE)))
                      for b in args.bits}
            for batch in args.batches:
                x = torch.randn(batch, k, generator=gen, device=device).half()
                io_bytes = 2 * batch * (k + n)
                fp16_ms = median_ms(partial(F.linear, x, w16), flush, args.warmup, args.reps)
                fp16_bytes = w16.numel() * 2 + io_bytes
                for bits, w in packed.items():
                    err = rel_err(dequant_matmul_triton(x, w), dequant_matmul_ref(x, w))
                    if err > TOLERANCE[torch.float16]:
                        raise SystemExit(f"bench_kernels: int{bits} {model} {projection} batch {batch}: fused "
                                         f"kernel disagrees with the reference (max rel err {err:.2e}); not timing it")
                    out = torch.empty(batch, n, dtype=torch.float16, device=device)
                    fused_ms = median_ms(partial(dequant_matmul_triton, x, w, out=out), flush, args.warmup, args.reps)
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
    return {"schema": "kernel-benchmark", "schema_version": 1,
            "device": {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "multiprocessors": props.multi_processor_count, "memory_bytes": props.total_memory},
            "versions": package_versions(), "git": git_state(),
            "settings": {"group_size": GROUP_SIZE, "sym": False, "activations": "fp16", "warmup": args.warmup,
                         "reps": args.reps, "statistic": "median", "l2_flush_bytes": L2_FLUSH_BYTES,
                         "copy_bytes": COPY_BYTES, "copy_bandwidth_counts": "read + write",
                         "bytes_counted": "weights (+ scales and zeros) + activations + outputs"},
            "copy_bandwidth_gbps": copy_gbps, "results": rows}


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="correctness pass only (CPU or GPU), writes nothing")
    parser.add_argument("--bits", type=int, nargs="+", default=list(BITS), choices=BITS)
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--out-dir", type=Path, default=REPO / "results" / "benchmarks")
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
