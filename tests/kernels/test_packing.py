"""Bit-packing: exact round trips for every width, the documented word layout, PackedWeight."""

from __future__ import annotations

import pytest
import torch

from dynamo.quant import QSpec, quantize_rtn
from dynamo.quant.rtn import QuantizedWeight
from kernels.packing import PACKED_BITS, PackedWeight, pack_codes, pack_factor, packed_columns, unpack_codes

GEN = torch.Generator().manual_seed(0)
# K values on both sides of every pack factor (16, 10, 8, 5, 4), 1 and a prime
ODD_COLS = (1, 3, 7, 10, 16, 31, 101, 130)


def random_codes(rows: int, cols: int, bits: int) -> torch.Tensor:
    return torch.randint(0, 2 ** bits, (rows, cols), generator=GEN, dtype=torch.int64).to(torch.uint8)


def python_word(values: list[int], bits: int) -> int:
    """The documented layout, one word at a time in plain Python ints, as a signed int32."""
    word = sum(v << (bits * j) for j, v in enumerate(values))
    return word - 2 ** 32 if word >= 2 ** 31 else word


def test_pack_factors_are_the_documented_ones():
    assert {b: pack_factor(b) for b in PACKED_BITS} == {2: 16, 3: 10, 4: 8, 6: 5, 8: 4}
    with pytest.raises(ValueError, match="packed widths"):
        pack_factor(5)
    with pytest.raises(ValueError, match="packed widths"):
        pack_factor(16)


@pytest.mark.parametrize("bits", PACKED_BITS)
@pytest.mark.parametrize("cols", ODD_COLS)
def test_round_trip_is_exact(bits, cols):
    codes = random_codes(5, cols, bits)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, packed_columns(cols, bits))
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


@pytest.mark.parametrize("bits", PACKED_BITS)
def test_extreme_codes_round_trip(bits):
    """All-ones codes set bit 31 of 2/4/8-bit words (negative int32): unpacking must not sign-extend."""
    top = torch.full((3, 37), 2 ** bits - 1, dtype=torch.uint8)
    for codes in (top, torch.zeros_like(top)):
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 37), codes)
    if 32 % bits == 0:
        assert int(pack_codes(top, bits)[0, 0]) == -1


@pytest.mark.parametrize("bits", PACKED_BITS)
def test_word_layout_matches_the_docstring(bits):
    pf = pack_factor(bits)
    cols = 3 * pf - 1  # the last word is padded
    codes = random_codes(4, cols, bits)
    packed = pack_codes(codes, bits)
    for n in range(4):
        values = codes[n].tolist() + [0]
        for w in range(3):
            assert int(packed[n, w]) == python_word(values[w * pf:(w + 1) * pf], bits), (n, w)
    if 32 % bits:  # 3 and 6 bits: the top 2 bits of every word are padding
        assert int((packed >> (pf * bits)).abs().max()) == 0


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
def test_packed_weight_from_quantized(bits, group_size):
    w = torch.randn(12, 101, generator=GEN)
    q = quantize_rtn(w, QSpec(bits, group_size=group_size))
    p = PackedWeight.from_quantized(q)
    assert p.shape == (12, 101) and p.bits == bits and p.group_size == group_size
    assert torch.equal(p.unpack(), q.codes)
    assert p.scales.dtype == torch.float16 and p.zeros.dtype == torch.float16
    assert torch.equal(p.zeros.float(), q.zeros)  # integer zeros are exact in fp16
    # only the fp16 rounding of the scales separates the two dequantizations
    assert torch.allclose(p.dequantize(), q.dequantize(), rtol=1e-3, atol=0)
    words = packed_columns(101, bits)
    groups = 1 if group_size == -1 else -(-101 // group_size)
    assert p.nbytes == 12 * words * 4 + 2 * 12 * groups * 2


def test_dequantize_uses_each_columns_own_group():
    codes = torch.tensor([[0, 1, 2, 3, 3, 2]], dtype=torch.uint8)
    q = QuantizedWeight(codes=codes, scales=torch.tensor([[1.0, 10.0, 100.0]]), zeros=torch.tensor([[0.0, 1.0, 2.0]]),
                        spec=QSpec(2, group_size=2))
    p = PackedWeight.from_quantized(q)
    assert p.dequantize().tolist() == [[0.0, 1.0, 10.0, 20.0, 100.0, 0.0]]


def test_act_order_groups_are_refused_unless_consecutive():
    q = quantize_rtn(torch.randn(4, 64, generator=GEN), QSpec(4, group_size=16))
    q.g_idx = torch.arange(64) // 16  # what a static-groups quantizer would record
    assert torch.equal(PackedWeight.from_quantized(q).unpack(), q.codes)
    q.g_idx = torch.randperm(64, generator=GEN) // 16
    with pytest.raises(ValueError, match="g_idx"):
        PackedWeight.from_quantized(q)


def test_sixteen_bit_weights_are_not_packed():
    q = QuantizedWeight(codes=torch.zeros(2, 4, dtype=torch.uint8), scales=torch.ones(2, 1), zeros=torch.zeros(2, 1),
                        spec=QSpec(16))
    with pytest.raises(ValueError, match="16-bit"):
        PackedWeight.from_quantized(q)


def test_inconsistent_shapes_are_refused():
    p = PackedWeight.from_quantized(quantize_rtn(torch.randn(4, 40, generator=GEN), QSpec(3, group_size=16)))
    with pytest.raises(ValueError, match="qweight"):
        PackedWeight(p.qweight, p.scales, p.zeros, 4, 16, (4, 40))  # 4-bit needs 5 words per row, not 4
    with pytest.raises(ValueError, match="scales"):
        PackedWeight(p.qweight, p.scales[:, :2], p.zeros, 3, 16, (4, 40))
