"""Every family: found by model_type, every expert reachable, writes land where they should."""

from __future__ import annotations

import pytest
import torch
from transformers import GptOssConfig, AutoModelForCausalLM

from dynamo.adapters import PROJECTIONS, adapter_for, expert_compute, moe_layers, registered_adapters
from dynamo.adapters.compute import routed_forward
from dynamo.errors import UserError
from tiny_families import EXPECTED, EXPERTS, FAMILIES, HIDDEN, INTER, build


def tokens(n=2, t=12, seed=1):
    return torch.randint(2, 64, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_experts_and_shapes(family):
    model = build(family)
    layers = list(moe_layers(model))
    indices, has_shared = EXPECTED[family]
    assert [layer.index for layer in layers] == indices
    for layer in layers:
        assert layer.n_experts == EXPERTS and layer.top_k == 2
        assert (layer.shared_expert is not None) == has_shared
        assert layer.weight(0, "gate").shape == (INTER, HIDDEN)
        assert layer.weight(0, "up").shape == (INTER, HIDDEN)
        assert layer.weight(0, "down").shape == (HIDDEN, INTER)
        assert (layer.intermediate_size, layer.hidden_size) == (INTER, HIDDEN)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_weight_is_visited_exactly_once(family):
    model = build(family)
    seen, visited = {}, 0
    for layer in moe_layers(model):
        for e in range(layer.n_experts):
            for proj in PROJECTIONS:
                w = layer.weight(e, proj)
                visited += w.numel()
                for i in range(w.shape[0]):  # every row of every view is a distinct piece of storage
                    key = (w.untyped_storage().data_ptr(), w.storage_offset() + i * w.stride(0))
                    assert key not in seen, f"{(layer.index, e, proj)} overlaps {seen[key]}"
                    seen[key] = (layer.index, e, proj)
    routed_params = sum(p.numel() for n, p in model.named_parameters()
                        if ".experts." in n or n.endswith(("experts.gate_up_proj", "experts.down_proj")))
    assert visited == routed_params, "some routed-expert weight is not reachable through the adapter"


@pytest.mark.parametrize("family", FAMILIES)
def test_read_write_roundtrip_is_a_noop_and_a_write_changes_exactly_one_expert(family):
    model = build(family)
    x = tokens()
    with torch.no_grad():
        before = model(input_ids=x).logits
        layer = list(moe_layers(model))[-1]
        for e in range(layer.n_experts):
            for proj in PROJECTIONS:
                layer.set_weight(e, proj, layer.weight(e, proj).clone())
        assert torch.equal(model(input_ids=x).logits, before)

        # Zero expert e's down projection: the block output must drop exactly weight * expert(x).
        captured = {}
        handle = layer.block.register_forward_hook(lambda m, a, o: captured.update(x=a[0], y=o))
        model(input_ids=x)
        hidden = captured["x"].reshape(-1, HIDDEN)
        y_before = captured["y"].reshape(-1, HIDDEN)

        def routing(layer_, h, idx, w):
            captured.update(idx=idx, w=w)
            return routed_forward(layer_, h, idx, w)

        with expert_compute(model, routing):
            model(input_ids=x)
        e = int(captured["idx"][0, 0])
        expected_drop = torch.zeros_like(hidden)
        token, slot = torch.where(captured["idx"] == e)
        expected_drop[token] = layer.expert_forward(e, hidden[token]) * captured["w"][token, slot, None]
        layer.set_weight(e, "down", torch.zeros_like(layer.weight(e, "down")))
        model(input_ids=x)
        y_after = captured["y"].reshape(-1, HIDDEN)
        handle.remove()
    torch.testing.assert_close(y_before - y_after, expected_drop, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_custom_expert_compute_is_used_and_then_removed(family):
    model = build(family)
    x = tokens()
    calls = []

    def compute(layer, h, idx, w):
        calls.append(layer.index)
        assert idx.shape == (h.shape[0], 2) and w.shape == idx.shape
        return routed_forward(layer, h, idx, w)

    with torch.no_grad():
        reference = model(input_ids=x).logits
        with expert_compute(model, compute):
            ours = model(input_ids=x).logits
        calls_inside = list(calls)
        after = model(input_ids=x).logits
    assert calls_inside == EXPECTED[family][0]
    assert len(calls) == len(calls_inside), "the custom compute stayed installed"
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    assert torch.equal(after, reference)


def test_family_is_found_by_model_type_not_name():
    model = build("olmoe")
    model.config.name_or_path = "deepseek-ai/looks-like-deepseek"
    assert adapter_for(model).model_type == "olmoe"


def test_every_registered_adapter_has_a_tiny_model():
    """FAMILIES is the registry's list: a supported adapter needs an entry in tiny_families (EXPECTED, CONFIGS)."""
    supported = {t for t, a in registered_adapters().items() if a.refuse is None}
    assert set(FAMILIES) == supported
    missing = sorted(supported - set(EXPECTED))
    assert not missing, f"adapters without a tiny model in tests/adapters/tiny_families.py: {missing}"
    for family in FAMILIES:
        assert adapter_for(build(family)).model_type == family


def test_transposed_layouts_are_refused_clearly():
    cfg = GptOssConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, head_dim=8)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UserError, match="transposed"):
        list(moe_layers(model))


def test_unknown_family_lists_the_supported_ones():
    from transformers import LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=8,
                                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UserError, match="no MoE adapter for model_type 'llama'.*olmoe"):
        adapter_for(model)
