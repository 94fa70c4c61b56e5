"""Bit-packing of b-bit weight codes into int32 words, and `PackedWeight`, what the kernels read.

Layout. A b-bit code is split into bit planes whose widths divide 32:

    b = 2, 4, 8: one plane of b bits
    b = 3:       a 2-bit plane (the code's low bits) and a 1-bit plane (its high bit)
    b = 6:       a 4-bit plane (low bits) and a 2-bit plane (high bits)

A plane of width p packs a [N, K] matrix (nn.Linear convention: N outputs, K inputs) along K,
32 / p values per int32 word, least significant first: value k of a row sits in word k // (32 / p)
at bits [p * (k % (32 / p)), p * (k % (32 / p)) + p). qweight is one int32 tensor
[N, sum over planes of ceil(K / (32 / p))], the planes' words concatenated along the word axis
(low plane first), and code = low | (high << low plane width).

Why planes: 3 and 6 do not divide 32. Packing whole codes would either leave bits of every word
unused (10 3-bit codes per word cost 3.2 bits a code, 5 6-bit codes 6.4 bits) or let codes
straddle two words. In a plane no value straddles a word, so the kernel unpacks each plane
with one load, one shift and one mask, the plane widths being compile-time constants, and
storage is exactly b bits per code whenever K is a multiple of 32 (3-bit) or 16 (6-bit).

When K is not a multiple of a plane's values per word, the plane's last word of each row is
filled with zeros; unpack drops them (the kernels mask k >= K). Bit 31 of a word holds data, so
words can be negative int32 values; unpacking masks after the (arithmetic) shift, which makes
that harmless.

Group parameters: scales [N, groups] fp16. Zeros, integers in [0, 2^b - 1] (symmetric specs
included), are packed with the same rule along the output axis: the [N, groups] matrix is
transposed and packed like codes, zeros [groups, packed_columns(N, b)] int32. Along N because
rows have few groups (1 or 2 at group 128 in a small model, 16 at K = 2048) but N is a multiple
of 32 in every model here, so each zero costs exactly b bits (packed along the groups, one
group's zero would fill a whole word per plane), and a tile's BLOCK_N zeros of one group are
adjacent words. So a weight stores what the harness's bit accounting
(`dynamo.quant.QSpec.storage_bits`) counts: b bits per code, 16 + b bits per group, up to the
padding of each plane's last word. A group is `group_size`
consecutive input columns, -1 = one group per row (`column_groups`);
w = scale * (q - zero). Act-order weights whose groups are not consecutive columns (a
non-trivial `g_idx`) are refused: our GPTQ keeps static groups (g_idx is None), so that case
never arises from this repository's quantizers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PLANES = {2: (2,), 3: (2, 1), 4: (4,), 6: (4, 2), 8: (8,)}  # plane widths, low bits first
PACKED_BITS = tuple(PLANES)
WORD_BITS = 32


def column_groups(cols: int, group_size: int, device=None) -> torch.Tensor:
    """The group of each of `cols` input columns: `group_size` consecutive columns a group, -1 one group a row."""
    group = cols if group_size == -1 else group_size
    return torch.arange(cols, device=device) // group


def plane_bits(bits: int) -> tuple[int, ...]:
    """The widths of a b-bit code's planes, low bits first: (2, 1) for 3 bits, (4, 2) for 6."""
    if bits not in PLANES:
        raise ValueError(f"cannot pack {bits}-bit codes; packed widths are {PACKED_BITS}")
    return PLANES[bits]


def plane_words(cols: int, plane: int) -> int:
    """Words per row of one plane of `plane`-bit values for `cols` values."""
    return -(-cols // (WORD_BITS // plane))


def packed_columns(cols: int, bits: int) -> int:
    """Words per row of `cols` b-bit codes, all planes together."""
    return sum(plane_words(cols, p) for p in plane_bits(bits))


def _pack_plane(values: torch.Tensor, plane: int) -> torch.Tensor:
    """values [N, K] int64 in [0, 2^plane) -> [N, ceil(K / (32 / plane))] int32."""
    per_word = WORD_BITS // plane
    rows, cols = values.shape
    words = plane_words(cols, plane)
    padded = torch.zeros(rows, words * per_word, dtype=torch.int64, device=values.device)
    padded[:, :cols] = values
    shifts = torch.arange(per_word, device=values.device, dtype=torch.int64) * plane
    # Fields are disjoint, so the sum is their bitwise OR. It is done in int64 and folded into
    # the int32 range by hand: relying on an overflowing int64 -> int32 cast would be
    # implementation-defined.
    unsigned = (padded.view(rows, words, per_word) << shifts).sum(-1)
    return torch.where(unsigned >= 2 ** 31, unsigned - 2 ** 32, unsigned).to(torch.int32)


def _unpack_plane(words: torch.Tensor, plane: int, cols: int) -> torch.Tensor:
    """[N, W] int32 -> values [N, cols] int32 (the padding of the last word dropped)."""
    shifts = torch.arange(WORD_BITS // plane, device=words.device, dtype=torch.int32) * plane
    fields = (words.unsqueeze(-1) >> shifts) & (2 ** plane - 1)
    return fields.reshape(words.shape[0], -1)[:, :cols]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] integers in [0, 2^b - 1] -> qweight [N, packed_columns(K, b)] int32 (layout above)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    planes = plane_bits(bits)
    wide = codes.to(torch.int64)
    if wide.numel() and (int(wide.min()) < 0 or int(wide.max()) > 2 ** bits - 1):
        raise ValueError(f"codes outside [0, {2 ** bits - 1}] cannot be packed into {bits} bits")
    packed, shift = [], 0
    for plane in planes:
        packed.append(_pack_plane((wide >> shift) & (2 ** plane - 1), plane))
        shift += plane
    return torch.cat(packed, dim=1)


def unpack_codes(qweight: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """qweight [N, W] int32 -> codes [N, cols] uint8 (the padding of each plane dropped)."""
    planes = plane_bits(bits)
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a 2-D int32 tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    if qweight.shape[1] != packed_columns(cols, bits):
        raise ValueError(f"{qweight.shape[1]} words per row cannot hold exactly {cols} {bits}-bit codes")
    codes = torch.zeros(qweight.shape[0], cols, dtype=torch.int32, device=qweight.device)
    start, shift = 0, 0
    for plane in planes:
        words = plane_words(cols, plane)
        codes |= _unpack_plane(qweight[:, start:start + words], plane, cols) << shift
        start, shift = start + words, shift + plane
    return codes.to(torch.uint8)


def _check_consecutive_groups(g_idx: torch.Tensor | None, cols: int, group_size: int) -> None:
    if g_idx is None:
        return
    expected = column_groups(cols, group_size, g_idx.device)
    if not torch.equal(g_idx.to(expected.dtype), expected):
        raise ValueError("act-order weights with permuted groups (a non-trivial g_idx) cannot be packed: the "
                         "kernels read each group as consecutive input columns. Quantize with static groups "
                         "(dynamo.quant.quantize_gptq keeps them; g_idx is then None)")


def _integer_zeros(zeros: torch.Tensor) -> torch.Tensor:
    rounded = zeros.round()
    if not torch.equal(rounded, zeros):
        raise ValueError("zeros must be integers to be packed")
    return rounded


@dataclass
class PackedWeight:
    """One [N, K] weight matrix as the kernels read it: packed codes and zeros plus fp16 scales."""

    qweight: torch.Tensor   # [N, packed_columns(K, bits)] int32, layout in the module docstring
    scales: torch.Tensor    # [N, groups] float16
    zeros: torch.Tensor     # [groups, packed_columns(N, bits)] int32: zeros^T packed along N like qweight
    bits: int
    group_size: int         # input columns per group; -1 = one group per row
    shape: tuple[int, int]  # (N, K) of the unpacked matrix

    def __post_init__(self):
        rows, cols = self.shape
        expected = {"qweight": (rows, packed_columns(cols, self.bits)), "scales": (rows, self.groups),
                    "zeros": (self.groups, packed_columns(rows, self.bits))}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} shape {tuple(getattr(self, name).shape)} != {shape} for a {self.shape} "
                                 f"{self.bits}-bit matrix")

    @classmethod
    def pack(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
             g_idx: torch.Tensor | None = None) -> PackedWeight:
        """Pack integer codes [N, K] in [0, 2^b - 1] and their group parameters scales / zeros [N, groups]
        (zeros integer-valued; w = scale * (q - zero)). `g_idx` [K], if given, must be consecutive groups."""
        _check_consecutive_groups(g_idx, int(codes.shape[1]), group_size)
        return cls(qweight=pack_codes(codes, bits), scales=scales.to(torch.float16),
                   zeros=pack_codes(_integer_zeros(zeros).T, bits), bits=bits, group_size=group_size,
                   shape=(int(codes.shape[0]), int(codes.shape[1])))

    @property
    def planes(self) -> tuple[int, ...]:
        return plane_bits(self.bits)

    @property
    def group(self) -> int:
        """Input columns per group, per-row groups resolved to K."""
        return self.shape[1] if self.group_size == -1 else self.group_size

    @property
    def groups(self) -> int:
        return -(-self.shape[1] // self.group)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        """Bytes a kernel reads for the weight: packed codes, scales and packed zeros."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def unpack(self) -> torch.Tensor:
        """The integer codes [N, K] uint8."""
        return unpack_codes(self.qweight, self.bits, self.shape[1])

    def zero_points(self) -> torch.Tensor:
        """The integer zeros [N, groups] uint8."""
        return unpack_codes(self.zeros, self.bits, self.shape[0]).T

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """w = scale * (q - zero) as [N, K], computed in fp32 (what the kernels compute in registers)."""
        g_idx = column_groups(self.shape[1], self.group_size, self.device)
        w = self.scales.float()[:, g_idx] * (self.unpack().float() - self.zero_points().float()[:, g_idx])
        return w.to(dtype)

    def to(self, device: torch.device | str) -> PackedWeight:
        return PackedWeight(self.qweight.to(device), self.scales.to(device), self.zeros.to(device), self.bits,
                            self.group_size, self.shape)
