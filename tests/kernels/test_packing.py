"""Bit-packing: exact round trips for every width, the documented plane layout, PackedWeight, storage vs accounting."""

from __future__ import annotations

import pytest
import torch

from dynamo.quant import QSpec, quantize_rtn
from dynamo.quant.rtn import QuantizedWeight
from dynamo.packed.weight import pack_weight
from dynamo_kernels.packing import (PACKED_BITS, WORD_BITS, PackedWeight, pack_codes, packed_columns, plane_bits,
                                    unpack_codes)

GEN = torch.Generator().manual_seed(0)
# K values on both sides of every plane's values per word (32, 16, 8, 4), 1 and a prime
ODD_COLS = (1, 3, 7, 10, 16, 31, 33, 101, 130)
# ((N, K), group size): expert projections at group 128, and a small model's (one or two groups per row)
ACCOUNTING_SHAPES = (((1024, 2048), 128), ((2048, 1024), 128), ((1408, 2048), 128), ((2048, 1408), 128),
                     ((256, 128), 128), ((128, 256), 128))


def random_codes(rows: int, cols: int, bits: int) -> torch.Tensor:
    return torch.randint(0, 2 ** bits, (rows, cols), generator=GEN, dtype=torch.int64).to(torch.uint8)


def python_word(values: list[int], bits: int) -> int:
    """One word of `bits`-bit values in plain Python ints, least significant first, as a signed int32."""
    word = sum(v << (bits * j) for j, v in enumerate(values))
    return word - 2 ** 32 if word >= 2 ** 31 else word


def python_row(codes: list[int], planes: tuple[int, ...]) -> list[int]:
    """The documented layout of one row: each plane's words (last one zero-padded), low plane first."""
    words, shift = [], 0
    for plane in planes:
        per_word = WORD_BITS // plane
        values = [(c >> shift) & (2 ** plane - 1) for c in codes]
        values += [0] * (-len(values) % per_word)
        words += [python_word(values[i:i + per_word], plane) for i in range(0, len(values), per_word)]
        shift += plane
    return words


def test_planes_are_the_documented_ones():
    assert {b: plane_bits(b) for b in PACKED_BITS} == {2: (2,), 3: (2, 1), 4: (4,), 6: (4, 2), 8: (8,)}
    with pytest.raises(ValueError, match="packed widths"):
        plane_bits(5)
    with pytest.raises(ValueError, match="packed widths"):
        plane_bits(16)
    # exactly b bits per code once K fills every plane's words
    assert {b: packed_columns(32, b) for b in PACKED_BITS} == {2: 2, 3: 3, 4: 4, 6: 6, 8: 8}


@pytest.mark.parametrize("bits", PACKED_BITS)
@pytest.mark.parametrize("cols", ODD_COLS)
def test_round_trip_is_exact(bits, cols):
    codes = random_codes(5, cols, bits)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, packed_columns(cols, bits))
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


@pytest.mark.parametrize("bits", PACKED_BITS)
def test_extreme_codes_round_trip(bits):
    """All-ones codes set bit 31 of every full word (negative int32): unpacking must not sign-extend."""
    top = torch.full((3, 37), 2 ** bits - 1, dtype=torch.uint8)
    for codes in (top, torch.zeros_like(top)):
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 37), codes)
    assert int(pack_codes(top, bits)[0, 0]) == -1


@pytest.mark.parametrize("bits", PACKED_BITS)
@pytest.mark.parametrize("cols", [67, 96])  # every plane's last word padded; none padded
def test_word_layout_matches_the_docstring(bits, cols):
    codes = random_codes(4, cols, bits)
    packed = pack_codes(codes, bits)
    for n in range(4):
        assert packed[n].tolist() == python_row(codes[n].tolist(), plane_bits(bits)), n


def test_four_bit_word_by_hand():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert int(pack_codes(codes, 4)[0, 0]) == 0x87654321 - 2 ** 32


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="outside"):
        pack_codes(torch.tensor([[8]], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="2-D"):
        pack_codes(torch.zeros(4, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="words per row"):
        unpack_codes(torch.zeros(2, 3, dtype=torch.int32), 4, 30)


@pytest.mark.parametrize("bits", PACKED_BITS)
@pytest.mark.parametrize("group_size", [-1, 32, 24])
def test_pack_weight(bits, group_size):
    w = torch.randn(12, 101, generator=GEN)
    q = quantize_rtn(w, QSpec(bits, group_size=group_size))
    p = pack_weight(q)
    assert p.shape == (12, 101) and p.bits == bits and p.group_size == group_size
    assert torch.equal(p.unpack(), q.codes)
    assert p.scales.dtype == torch.float16 and p.zeros.dtype == torch.int32
    groups = 1 if group_size == -1 else -(-101 // group_size)
    assert p.zeros.shape == (groups, packed_columns(12, bits))
    assert torch.equal(p.zero_points().float(), q.zeros)
    # only the fp16 rounding of the scales separates the two dequantizations
    assert torch.allclose(p.dequantize(), q.dequantize(), rtol=1e-3, atol=0)
    assert p.nbytes == 12 * packed_columns(101, bits) * 4 + 12 * groups * 2 + groups * packed_columns(12, bits) * 4


@pytest.mark.parametrize("bits", PACKED_BITS)
@pytest.mark.parametrize("group_size", [-1, 4, 24])
@pytest.mark.parametrize("sym", [False, True])
def test_zeros_round_trip(bits, group_size, sym):
    """1 to 33 groups of 67 zeros (several words per plane, the last padded), asymmetric and symmetric."""
    q = quantize_rtn(torch.randn(67, 131, generator=GEN), QSpec(bits, group_size=group_size, sym=sym))
    p = pack_weight(q)
    assert p.zeros.shape == (p.groups, packed_columns(67, bits))
    assert torch.equal(p.zero_points().float(), q.zeros)
    assert torch.equal(p.zeros, pack_codes(q.zeros.T, bits))  # the zeros of a group packed along N


def test_fractional_zeros_are_refused():
    q = quantize_rtn(torch.randn(4, 32, generator=GEN), QSpec(4, group_size=16))
    q.zeros[0, 0] += 0.5
    with pytest.raises(ValueError, match="integers"):
        pack_weight(q)


@pytest.mark.parametrize("bits", PACKED_BITS)
def test_storage_matches_the_bit_accounting(bits):
    """Packed bytes equal QSpec.storage_bits (b-bit codes, fp16 scale and b-bit zero per group): every N and
    K here is a multiple of 32, so no plane pads (the acceptance is 2 %)."""
    for (n, k), group_size in ACCOUNTING_SHAPES:
        spec = QSpec(bits, group_size=group_size)
        groups = -(-k // group_size)
        q = QuantizedWeight(codes=torch.zeros(n, k, dtype=torch.uint8), scales=torch.ones(n, groups),
                            zeros=torch.zeros(n, groups), spec=spec)
        ratio = pack_weight(q).nbytes * 8 / spec.storage_bits(n, k)
        print(f"int{bits} g{group_size} [{n}, {k}]: packed bytes / accounted bytes = {ratio:.4f}")
        assert ratio == 1, (n, k, ratio)


def test_dequantize_uses_each_columns_own_group():
    codes = torch.tensor([[0, 1, 2, 3, 3, 2]], dtype=torch.uint8)
    q = QuantizedWeight(codes=codes, scales=torch.tensor([[1.0, 10.0, 100.0]]), zeros=torch.tensor([[0.0, 1.0, 2.0]]),
                        spec=QSpec(2, group_size=2))
    p = pack_weight(q)
    assert p.dequantize().tolist() == [[0.0, 1.0, 10.0, 20.0, 100.0, 0.0]]


def test_act_order_groups_are_refused_unless_consecutive():
    q = quantize_rtn(torch.randn(4, 64, generator=GEN), QSpec(4, group_size=16))
    q.g_idx = torch.arange(64) // 16  # what a static-groups quantizer would record
    assert torch.equal(pack_weight(q).unpack(), q.codes)
    q.g_idx = torch.randperm(64, generator=GEN) // 16
    with pytest.raises(ValueError, match="g_idx"):
        pack_weight(q)


def test_sixteen_bit_weights_are_not_packed():
    q = QuantizedWeight(codes=torch.zeros(2, 4, dtype=torch.uint8), scales=torch.ones(2, 1), zeros=torch.zeros(2, 1),
                        spec=QSpec(16))
    with pytest.raises(ValueError, match="16-bit"):
        pack_weight(q)


def test_inconsistent_shapes_are_refused():
    p = pack_weight(quantize_rtn(torch.randn(4, 40, generator=GEN), QSpec(3, group_size=16)))
    with pytest.raises(ValueError, match="qweight"):
        PackedWeight(p.qweight, p.scales, p.zeros, 2, 16, (4, 40))  # 2-bit needs 3 words per row, not 3 + 2
    with pytest.raises(ValueError, match="scales"):
        PackedWeight(p.qweight, p.scales[:, :2], p.zeros, 3, 16, (4, 40))
    with pytest.raises(ValueError, match="zeros"):
        PackedWeight(p.qweight, p.scales, p.zeros.T, 3, 16, (4, 40))
