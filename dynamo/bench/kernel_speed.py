"""Fused dequantize + matmul speed on one expert projection against F.linear in FP16, timed by
triton.testing.do_bench (CUDA events, the L2 cache flushed before each call), with the device-to-device copy
bandwidth as the roofline the bytes are compared with."""

from __future__ import annotations

import argparse
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from .common import GROUP_SIZE, TOLERANCE, rel_err

MODELS = {"olmoe-1b-7b": (2048, 1024), "qwen1.5-moe-a2.7b": (2048, 1408), "deepseek-moe-16b": (2048, 1408)}
COPY_BYTES = 1 << 30


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
    from ..packed.weight import pack_weight
    from ..quant import QSpec, quantize_rtn
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
