"""`bench_kernels.py --check`: every fused kernel against its torch reference on small odd shapes, and a tiny
packed model decoding against its fake-quantized twin. Runs on CPU (under TRITON_INTERPRET=1, which the
caller sets before triton is first imported: every kernel import here is inside a function)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import MIXED_WIDTHS, TOLERANCE, pack_mixed, rel_err

BITS = (2, 3, 4, 6, 8)  # every width the kernels serve
TINY_CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, num_experts=6, num_experts_per_tok=2, max_position_embeddings=64)


def check(device: torch.device) -> int:
    """Each kernel against its reference on small odd shapes; 0 when all agree."""
    from ..packed.weight import pack_weight
    from ..quant import QSpec, quantize_rtn
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


def decode_model(config: dict, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, OlmoeConfig

    torch.manual_seed(0)
    cfg = OlmoeConfig(**config, pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()


def check_decode(device: torch.device, dtype: torch.dtype) -> float:
    """A tiny packed model against its fake-quantized twin (max rel err of the logits); decodes a few tokens."""
    import copy

    from ..packed.model import attach_packed, write_dequantized

    model = decode_model(TINY_CONFIG, dtype, device)
    packed = pack_mixed(model)[0]
    write_dequantized(model, packed)  # the twin holds exactly the packed values (fp16 scales)
    reference = copy.deepcopy(model)
    attach_packed(model, packed)
    ids = torch.randint(1, TINY_CONFIG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        err = rel_err(model(ids).logits, reference(ids).logits)
    model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    return err
