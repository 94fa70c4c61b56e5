"""Fused dequantize + matmul Triton kernels for packed low-bit weights (decode regime, M = 1..64).

- `dequant_matmul_triton(x, w)`: y [M, N] = x [M, K] @ W^T for one `PackedWeight` W [N, K].
- `grouped_dequant_matmul_triton(x, stack, routing, in_div, out)`: every expert of a
  `WeightStack` over the rows routed to it, in one launch. The routed rows are cut into blocks
  of BLOCK_M rows of one expert (padded with -1); a program computes one block x BLOCK_N
  outputs with that expert's weights, gathering its input rows (row r reads x[r // in_div]: the
  token for gate/up, the row itself for down) and scattering its outputs to out[r, offset + n].

Both share `_dequantized_tile`: a [BLOCK_K, BLOCK_N] tile of W^T is unpacked from the int32
words, one load, shift and mask per bit plane (layout in packing.py; the plane widths are
compile-time constants, a high plane's offset follows from K), its zeros unpacked the same
way from the group's row of packed zeros (packed along N), dequantized in registers as
scale * (q - zero) in fp32, cast to x's dtype and fed to `tl.dot` with fp32 accumulation.
Dequantized weights never reach memory.

Decode has few output tiles (N / BLOCK_N = 16 for N = 1024), too few programs to keep a
large GPU's memory system busy, so on CUDA the single-matrix kernel splits K across programs
(fp32 atomic adds into a zeroed workspace). The grouped kernel already has one program row
per routed block.

Without a GPU the kernels run under Triton's interpreter on CPU tensors. TRITON_INTERPRET=1
must be set before triton is first imported: `triton.language` and `triton.jit` read it then.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .experts import Routing, WeightStack
from .packing import PackedWeight, plane_bits

INTERPRETED = bool(triton.knobs.runtime.interpret)  # how this module's kernels were built (see above)
MIN_DOT = 16  # tl.dot needs every block dimension >= 16


@triton.jit
def _plane(row_ptr, idx, mask, PLANE: tl.constexpr):
    """Value idx of a plane of PLANE-bit values starting at row_ptr (int32)."""
    words = tl.load(row_ptr + idx // (32 // PLANE), mask=mask, other=0)
    return (words >> ((idx % (32 // PLANE)) * PLANE)) & ((1 << PLANE) - 1)


@triton.jit
def _unpacked(row_ptr, idx, count, mask, LOW_BITS: tl.constexpr, HIGH_BITS: tl.constexpr):
    """Code idx of a row of `count` codes packed in planes (packing.py); HIGH_BITS == 0: one plane."""
    q = _plane(row_ptr, idx, mask, LOW_BITS)
    if HIGH_BITS > 0:
        low_words = (count + 32 // LOW_BITS - 1) // (32 // LOW_BITS)
        q |= _plane(row_ptr + low_words, idx, mask, HIGH_BITS) << LOW_BITS
    return q


@triton.jit
def _dequantized_tile(qw_ptr, s_ptr, z_ptr, stride_qn, stride_sn, stride_zg, offs_k, offs_n, k0, K, N,
                      LOW_BITS: tl.constexpr, HIGH_BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """W^T[k0 : k0 + BLOCK_K, offs_n] in fp32; zero outside [0, K) x [0, N)."""
    mask_k = offs_k < K
    mask_n = offs_n < N
    mask = mask_k[:, None] & mask_n[None, :]
    q = _unpacked(qw_ptr + offs_n[None, :] * stride_qn, offs_k[:, None], K, mask, LOW_BITS, HIGH_BITS)
    if GROUP == 0:  # one group per row
        s = tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0)[None, :]
        z = _unpacked(z_ptr, offs_n, N, mask_n, LOW_BITS, HIGH_BITS)[None, :]
    elif GROUP % BLOCK_K == 0:  # the tile lies inside one group: one scale per output column
        g = k0 // GROUP
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0)[None, :]
        z = _unpacked(z_ptr + g * stride_zg, offs_n, N, mask_n, LOW_BITS, HIGH_BITS)[None, :]
    else:  # groups narrower than the tile, or not aligned to it: a scale per element
        g = (offs_k // GROUP)[:, None]
        s = tl.load(s_ptr + offs_n[None, :] * stride_sn + g, mask=mask, other=0.0)
        z = _unpacked(z_ptr + g * stride_zg, offs_n[None, :], N, mask, LOW_BITS, HIGH_BITS)
    return s.to(tl.float32) * (q.to(tl.float32) - z.to(tl.float32))


@triton.jit
def _dequant_matmul_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, K, k_per_split,
                           stride_xm, stride_qn, stride_sn, stride_zg, stride_ym,
                           LOW_BITS: tl.constexpr, HIGH_BITS: tl.constexpr, GROUP: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _dequantized_tile(qw_ptr, s_ptr, z_ptr, stride_qn, stride_sn, stride_zg, offs_k, offs_n, k0, K, N,
                              LOW_BITS, HIGH_BITS, GROUP, BLOCK_K)
        acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


@triton.jit
def _grouped_dequant_matmul_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, rows_ptr, block_slot_ptr, block_col_ptr,
                                   N, K, in_div, stride_xm, stride_qs, stride_qn, stride_ss, stride_sn, stride_zs,
                                   stride_zg, stride_ym,
                                   LOW_BITS: tl.constexpr, HIGH_BITS: tl.constexpr, GROUP: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                   DOT_PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    slot = tl.load(block_slot_ptr + pid_b).to(tl.int64)
    col0 = tl.load(block_col_ptr + pid_b)
    rows = tl.load(rows_ptr + pid_b * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows >= 0
    in_rows = tl.where(valid, rows // in_div, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    qw = qw_ptr + slot * stride_qs
    s = s_ptr + slot * stride_ss
    z = z_ptr + slot * stride_zs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + in_rows[:, None] * stride_xm + offs_k[None, :],
                    mask=valid[:, None] & (offs_k[None, :] < K), other=0.0)
        w = _dequantized_tile(qw, s, z, stride_qn, stride_sn, stride_zg, offs_k, offs_n, k0, K, N,
                              LOW_BITS, HIGH_BITS, GROUP, BLOCK_K)
        acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + col0 + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


@dataclass(frozen=True)
class TileConfig:
    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _block_k(group_size: int, cols: int) -> int:
    """Largest power-of-two tile <= 128 that lies inside one group, so scales load once per tile."""
    block = min(128, max(MIN_DOT, _pow2_at_least(cols)))
    if group_size == -1:
        return block
    aligned = block
    while aligned > MIN_DOT and group_size % aligned:
        aligned //= 2
    return aligned if group_size % aligned == 0 else min(block, 64)  # else per-element scales, any tile


def default_config(rows: int, w: PackedWeight | WeightStack, device: torch.device) -> TileConfig:
    """A fixed heuristic (no autotuning: tuning needs the GPU it runs on)."""
    n, k = w.shape
    block_m = min(64, max(MIN_DOT, _pow2_at_least(rows)))
    block_n = min(64, max(MIN_DOT, _pow2_at_least(n)))
    block_k = _block_k(w.group_size, k)
    split_k = 1
    if device.type == "cuda" and isinstance(w, PackedWeight):
        programs = triton.cdiv(n, block_n) * triton.cdiv(rows, block_m)
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        split_k = max(1, min(triton.cdiv(k, block_k), target // programs))
    return TileConfig(block_m, block_n, block_k, split_k)


def _check(x: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> None:
    if x.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before triton is first "
                           "imported to run on CPU (dynamo_kernels.dispatch falls back to the torch reference)")
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"weights and activations must be on one device (activations on {x.device})")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"activations must be fp16, bf16 or fp32, got {x.dtype}")


def _group_constexpr(group_size: int) -> int:
    return 0 if group_size == -1 else group_size


def _plane_constexprs(bits: int) -> dict[str, int]:
    low, *high = plane_bits(bits)
    return {"LOW_BITS": low, "HIGH_BITS": high[0] if high else 0}


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32: no tf32 rounding; fp16/bf16 ignore it


def dequant_matmul_triton(x: torch.Tensor, w: PackedWeight, *, out: torch.Tensor | None = None,
                          config: TileConfig | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequantize(w)^T, with w dequantized in registers."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"activations have {x.shape[-1]} features, the weight expects {k}")
    _check(x, (w.qweight, w.scales, w.zeros))
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be a row-major [{m}, {n}] {x.dtype} tensor")
    cfg = config or default_config(m, w, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split_k = triton.cdiv(k, k_per_split)
    target = out if split_k == 1 else torch.zeros(m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split_k)
    _dequant_matmul_kernel[grid](
        x2, w.qweight, w.scales, w.zeros, target, m, n, k, k_per_split,
        x2.stride(0), w.qweight.stride(0), w.scales.stride(0), w.zeros.stride(0), target.stride(0),
        **_plane_constexprs(w.bits), GROUP=_group_constexpr(w.group_size), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split_k, DOT_PRECISION=_dot_precision(x.dtype))
    if split_k > 1:
        out.copy_(target)
    return out.view(*x.shape[:-1], n)


def block_table(stack: WeightStack, routing: Routing, block_m: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks of <= block_m rows of one slot: rows [B, block_m] int32 (-1 = padding), slot [B], column offset [B]."""
    device = routing.order.device
    counts = routing.counts[stack.experts]
    blocks = (counts + block_m - 1) // block_m
    block_slot = torch.repeat_interleave(torch.arange(stack.slots, device=device), blocks)
    first_block = torch.cumsum(blocks, 0) - blocks
    local = ((torch.arange(block_slot.numel(), device=device) - first_block[block_slot])[:, None] * block_m
             + torch.arange(block_m, device=device)[None, :])
    valid = local < counts[block_slot][:, None]
    position = (routing.starts[stack.experts][block_slot][:, None] + local).clamp(max=routing.order.numel() - 1)
    rows = torch.where(valid, routing.order[position], -1)
    return (rows.to(torch.int32).contiguous(), block_slot.to(torch.int32),
            stack.col_offsets[block_slot].to(torch.int32))


def grouped_dequant_matmul_triton(x: torch.Tensor, stack: WeightStack, routing: Routing, in_div: int,
                                  out: torch.Tensor, *, config: TileConfig | None = None) -> torch.Tensor:
    """For each slot s and each row r routed to its expert: out[r, off_s : off_s + N] = x[r // in_div] @ W_s^T.

    One launch for the whole stack; rows routed to other experts are left untouched.
    """
    if stack.is_dense:
        raise ValueError("a 16-bit stack has no packed weights; compute it with torch (dynamo_kernels.moe does)")
    n, k = stack.shape
    if x.shape[-1] != k or x.dim() != 2:
        raise ValueError(f"activations must be [rows, {k}], got {tuple(x.shape)}")
    _check(x, (stack.qweight, stack.scales, stack.zeros, out, routing.order))
    if out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be a row-major {x.dtype} tensor")
    x = x.contiguous()
    cfg = config or default_config(max(1, routing.order.numel() // max(1, stack.slots)), stack, x.device)
    rows, block_slot, block_col = block_table(stack, routing, cfg.block_m)
    if block_slot.numel() == 0:
        return out
    grid = (triton.cdiv(n, cfg.block_n), block_slot.numel())
    _grouped_dequant_matmul_kernel[grid](
        x, stack.qweight, stack.scales, stack.zeros, out, rows, block_slot, block_col, n, k, in_div,
        x.stride(0), stack.qweight.stride(0), stack.qweight.stride(1), stack.scales.stride(0),
        stack.scales.stride(1), stack.zeros.stride(0), stack.zeros.stride(1), out.stride(0),
        **_plane_constexprs(stack.bits), GROUP=_group_constexpr(stack.group_size), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, DOT_PRECISION=_dot_precision(x.dtype))
    return out
