"""A packed model (routed experts from PackedWeight) gives the fake-quantized model's logits."""

from __future__ import annotations

import pytest
import torch

from dynamo.adapters import moe_layers
from dynamo.quant import QSpec, QuantPlan, apply_plan
from dynamo.packed.model import pack_experts, packed_forward, release_dense_experts, write_dequantized
from dynamo_kernels.packing import PackedWeight
from tiny_families import EXPERTS, build

WIDTHS = (2, 3, 16, 6)  # expert e gets WIDTHS[e]; 16 stays dense


def mixed_plan(model) -> QuantPlan:
    plan = QuantPlan(method="rtn", default=QSpec(4, group_size=8))
    for layer in moe_layers(model):
        for expert in range(EXPERTS):
            plan.set_expert_bits(layer.index, expert, WIDTHS[expert])
    plan.bits[(next(iter(moe_layers(model))).index, 0, "down")] = 8  # one projection differs from its expert
    return plan


def packed_and_fake(family: str):
    """(model with dense weights released, its packed experts, fake-quant logits, input ids)."""
    model = build(family)
    report = apply_plan(model, mixed_plan(model), keep_codes=True)
    packed = pack_experts(model, report.codes)
    write_dequantized(model, packed)  # fake-quant with the packed values (fp16 scales)
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fake = model(ids).logits
    assert release_dense_experts(model) > 0
    return model, packed, fake, ids


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek"])  # fused with/without shared, ModuleList
def test_packed_model_logits_equal_fake_quant_logits(family):
    model, packed, fake, ids = packed_and_fake(family)
    first = packed[min(packed)]
    widths = sorted({s.bits for s in first.stages["gate_up"]})
    assert widths == [2, 3, 6, 16] and isinstance(first.weight(1, "up"), PackedWeight)
    assert first.weight(0, "down").bits == 8
    with torch.no_grad(), packed_forward(model, packed, backend="torch"):
        logits = model(ids).logits
    assert torch.allclose(logits, fake, rtol=0, atol=1e-5 * float(fake.abs().max()))
    with pytest.raises((RuntimeError, IndexError)), torch.no_grad():  # dense experts gone: only the packed path runs
        model(ids)


@pytest.mark.slow
def test_packed_embedded_model_ppl_equals_fake_quant_ppl():
    """The embedded tiny-olmoe, 3-bit RTN experts: the packed model's PPL is the fake-quant PPL (<= 0.1%)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynamo.config import REPO_ROOT, SourceConfig
    from dynamo.data import load_documents
    from dynamo.eval.perplexity import make_windows, token_perplexity, tokenize_corpus

    path = REPO_ROOT / "assets" / "models" / "tiny-olmoe"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    source = SourceConfig(path="code")
    windows = make_windows(tokenize_corpus(tokenizer, load_documents(source, "test"), source.separator), 256, 4)
    report = apply_plan(model, QuantPlan(method="rtn", default=QSpec(3)), keep_codes=True)
    packed = pack_experts(model, report.codes)
    write_dequantized(model, packed)  # the fake-quant reference holds exactly the packed values
    fake = token_perplexity(model, windows, batch_size=4).ppl
    release_dense_experts(model)
    with packed_forward(model, packed, backend="torch"):
        ppl = token_perplexity(model, windows, batch_size=4).ppl
    assert abs(ppl / fake - 1) <= 1e-3, (ppl, fake)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_packed_memory_equals_the_bit_accounting(bits):
    """Embedded tiny-olmoe at fp16, every routed expert RTN at `bits` (group 128), packed and attached:
    the bytes of its packed expert parameters are the bit accounting's (codes, fp16 scales, b-bit zeros)
    within 2%, and so is the whole model's parameter memory (the other weights stay fp16)."""
    from transformers import AutoModelForCausalLM

    from dynamo.config import REPO_ROOT
    from dynamo.quant.bits import bit_accounting
    from dynamo.packed.model import attach_packed

    model = AutoModelForCausalLM.from_pretrained(REPO_ROOT / "assets" / "models" / "tiny-olmoe", dtype=torch.float16)
    plan = QuantPlan(method="rtn", default=QSpec(bits, group_size=128))
    report = apply_plan(model, plan, keep_codes=True)
    accounting = bit_accounting(model, plan.spec_for)
    expected_experts = accounting["experts"] * accounting["expert_params"] / 8
    expected_all = accounting["all"] * sum(p.numel() for p in model.parameters()) / 8
    attach_packed(model, pack_experts(model, report.codes))
    measured_experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                           if ".experts.packed." in n)  # the per-slot bookkeeping (expert ids, offsets) included
    measured_all = sum(p.numel() * p.element_size() for p in model.parameters())
    assert abs(measured_experts / expected_experts - 1) <= 0.02, (measured_experts, expected_experts)
    assert abs(measured_all / expected_all - 1) <= 0.02, (measured_all, expected_all)
