"""Bit-packing of b-bit weight codes into int32 words, and `PackedWeight`, what the kernels read.

Layout (the same rule for every width, so one unpack expression serves them all):

    values per word  PF = floor(32 / b):  b = 2 -> 16,  3 -> 10,  4 -> 8,  6 -> 5,  8 -> 4
    a [N, K] code matrix (nn.Linear convention: N outputs, K inputs) packs along K into
    qweight [N, ceil(K / PF)] int32;  code (n, k) sits in word (n, k // PF) at bits
    [b * (k % PF), b * (k % PF) + b), least significant first.

3- and 6-bit codes do not divide 32: their words hold 10 (resp. 5) codes and leave the top
2 bits zero. We chose that over the dense alternatives (32 codes in 3 words, 16 in 3 words)
because a code then never straddles two words: the kernel unpacks code k with one load and
one shift, `(qweight[n, k // PF] >> (b * (k % PF))) & (2^b - 1)`, for every width, with b and
PF as compile-time constants. The price is 2 unused bits per word: 3-bit codes cost 3.2 bits
and 6-bit codes 6.4 bits of storage (6.7 % more), so the memory-bound ceiling of a 3-bit
decode step is 16 / 3.2 = 5.0x over FP16 instead of 16 / 3 = 5.3x.

When K is not a multiple of PF the last word of each row is filled with zero codes; unpack
drops them (the kernels mask k >= K). Bit 31 of a 2/4/8-bit word holds data, so words are
negative int32 values; unpacking masks after the (arithmetic) shift, which makes that harmless.

Group parameters: scales [N, groups] fp16 and zeros [N, groups] fp16 (integer values, not
packed: fp16 holds every integer up to 2048 exactly, and the kernel then computes
w = scale * (q - zero) with no unpacking of zeros; a group of 128 pays 16 instead of b bits
for its zero, about 0.1 bit per weight). A group is `group_size` consecutive input columns,
-1 = one group per row, as in `dynamo.quant.rtn`. Act-order weights whose groups are not
consecutive columns (a non-trivial `g_idx`) are refused: our GPTQ keeps static groups
(g_idx is None), so that case never arises from this repository's quantizers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynamo.quant.rtn import QuantizedWeight, column_groups

PACKED_BITS = (2, 3, 4, 6, 8)
WORD_BITS = 32


def pack_factor(bits: int) -> int:
    """Codes per int32 word: 16, 10, 8, 5, 4 for 2, 3, 4, 6, 8 bits."""
    if bits not in PACKED_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; packed widths are {PACKED_BITS}")
    return WORD_BITS // bits


def packed_columns(cols: int, bits: int) -> int:
    return -(-cols // pack_factor(bits))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] integers in [0, 2^b - 1] -> qweight [N, ceil(K / PF)] int32 (layout above)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    pf = pack_factor(bits)
    rows, cols = codes.shape
    wide = codes.to(torch.int64)
    if wide.numel() and (int(wide.min()) < 0 or int(wide.max()) > 2 ** bits - 1):
        raise ValueError(f"codes outside [0, {2 ** bits - 1}] cannot be packed into {bits} bits")
    words = packed_columns(cols, bits)
    padded = torch.zeros(rows, words * pf, dtype=torch.int64, device=codes.device)
    padded[:, :cols] = wide
    shifts = torch.arange(pf, device=codes.device, dtype=torch.int64) * bits
    # Fields are disjoint, so the sum is their bitwise OR. It is done in int64 and folded into
    # the int32 range by hand: relying on an overflowing int64 -> int32 cast would be
    # implementation-defined.
    unsigned = (padded.view(rows, words, pf) << shifts).sum(-1)
    return torch.where(unsigned >= 2 ** 31, unsigned - 2 ** 32, unsigned).to(torch.int32)


def unpack_codes(qweight: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """qweight [N, W] int32 -> codes [N, cols] uint8 (the padding codes of the last word dropped)."""
    pf = pack_factor(bits)
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    if qweight.shape[1] != packed_columns(cols, bits):
        raise ValueError(f"{qweight.shape[1]} words per row cannot hold exactly {cols} {bits}-bit codes")
    shifts = torch.arange(pf, device=qweight.device, dtype=torch.int32) * bits
    fields = (qweight.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    return fields.reshape(qweight.shape[0], -1)[:, :cols].to(torch.uint8)


def _check_consecutive_groups(q: QuantizedWeight) -> None:
    if q.g_idx is None:
        return
    expected = column_groups(q.codes.shape[1], q.spec, q.g_idx.device)
    if not torch.equal(q.g_idx.to(expected.dtype), expected):
        raise ValueError("act-order weights with permuted groups (a non-trivial g_idx) cannot be packed: the "
                         "kernels read each group as consecutive input columns. Quantize with static groups "
                         "(dynamo.quant.quantize_gptq keeps them; g_idx is then None)")


@dataclass
class PackedWeight:
    """One [N, K] weight matrix as the kernels read it: packed codes plus fp16 group parameters."""

    qweight: torch.Tensor   # [N, ceil(K / PF)] int32, layout in the module docstring
    scales: torch.Tensor    # [N, groups] float16
    zeros: torch.Tensor     # [N, groups] float16 (integer values in [0, 2^b - 1])
    bits: int
    group_size: int         # input columns per group; -1 = one group per row
    shape: tuple[int, int]  # (N, K) of the unpacked matrix

    def __post_init__(self):
        rows, cols = self.shape
        groups = 1 if self.group_size == -1 else -(-cols // self.group_size)
        if tuple(self.qweight.shape) != (rows, packed_columns(cols, self.bits)):
            raise ValueError(f"qweight shape {tuple(self.qweight.shape)} does not hold a {self.shape} "
                             f"{self.bits}-bit matrix")
        for name in ("scales", "zeros"):
            if tuple(getattr(self, name).shape) != (rows, groups):
                raise ValueError(f"{name} shape {tuple(getattr(self, name).shape)} != {(rows, groups)}")

    @classmethod
    def from_quantized(cls, q: QuantizedWeight) -> PackedWeight:
        if q.spec.is_float:
            raise ValueError("a 16-bit (unquantized) weight has no codes to pack; keep it as a dense tensor")
        _check_consecutive_groups(q)
        return cls(qweight=pack_codes(q.codes, q.spec.bits), scales=q.scales.to(torch.float16),
                   zeros=q.zeros.to(torch.float16), bits=q.spec.bits, group_size=q.spec.group_size,
                   shape=(int(q.codes.shape[0]), int(q.codes.shape[1])))

    @property
    def pack_factor(self) -> int:
        return pack_factor(self.bits)

    @property
    def group(self) -> int:
        """Input columns per group, per-row groups resolved to K."""
        return self.shape[1] if self.group_size == -1 else self.group_size

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        """Bytes a kernel reads for the weight: packed codes, scales and zeros."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def unpack(self) -> torch.Tensor:
        """The integer codes [N, K] uint8."""
        return unpack_codes(self.qweight, self.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """w = scale * (q - zero) as [N, K], computed in fp32 (what the kernels compute in registers)."""
        g_idx = torch.arange(self.shape[1], device=self.device) // self.group
        w = self.scales.float()[:, g_idx] * (self.unpack().float() - self.zeros.float()[:, g_idx])
        return w.to(dtype)

    def to(self, device: torch.device | str) -> PackedWeight:
        return PackedWeight(self.qweight.to(device), self.scales.to(device), self.zeros.to(device), self.bits,
                            self.group_size, self.shape)

