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
import sys
from pathlib import Path

import torch

from ..config import REPO_ROOT
from .common import GROUP_SIZE, device_slug
from .kernel_check import BITS, check
from .kernel_speed import COPY_BYTES, MODELS, bench_projections, copy_bandwidth_gbps, l2_flush_bytes
from .moe_speed import bench_decode, bench_moe_layers

PARTS = ("kernels", "moe", "decode")
BATCHES = (1, 4, 16, 64)
NO_CUDA = ("bench_kernels: a CUDA device is needed for speed numbers and none was found; nothing written "
           "(--check runs a correctness pass on CPU)")


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
    from ..records import git_state, package_versions

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


def main(argv: list[str] | None = None) -> None:
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
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.check:
        if not cuda:  # must precede the first import of triton (kernels are imported inside check)
            os.environ["TRITON_INTERPRET"] = "1"
        sys.exit(check(torch.device("cuda" if cuda else "cpu")))
    if not cuda:
        sys.exit(NO_CUDA)
    from ..records import write_json_atomic

    device = torch.device("cuda")
    report = bench(device, args)
    path = args.out_dir / f"kernels-{device_slug(report['device']['name'])}.json"
    write_json_atomic(path, report)
    print(f"wrote {path}")
