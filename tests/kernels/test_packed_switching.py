"""A packed model with DQS channel rows: same outputs as the fake-quantized model, switches in place,
saves and reloads through transformers with its quantization config."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from switching_setup import LOW, VOCAB, logits, quantized, tokens

from dynamo.errors import UserError
from dynamo.switching import DynamicSwitcher
from dynamo.packed.format import load_packed
from dynamo.packed.model import attach_packed, pack_experts, packed_modules, write_dequantized
from dynamo.packed.switching import PackedChannelStore

FAMILIES = ["olmoe", "qwen2_moe"]
NEW = (0, VOCAB // 4)  # a "novel" slice of the vocabulary: the switch moves experts


def dense_and_packed(family: str, mode: str = "requant"):
    """The same BQ model twice, fake-quantized and packed (channel rows from the cache), each with a switcher."""
    s = quantized(family, method="fcm", target_bits=3.0, keep_codes=True)
    write_dequantized(s.model, pack_experts(s.model, s.codes))  # fake-quant with the packed values (fp16 scales)
    dense = copy.deepcopy(s.model)
    attach_packed(s.model, pack_experts(s.model, s.codes, s.cache))
    args = (s.plan, s.significance, s.cache, s.allocation)
    dense_sw = DynamicSwitcher(dense, *args, channel_mode=mode)
    packed_sw = DynamicSwitcher(s.model, *args, channel_mode=mode, store=PackedChannelStore(s.model, s.cache))
    return s, dense_sw, packed_sw


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


def packed_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".experts.packed." in n}


@pytest.mark.parametrize("mode", ["requant", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_switch_matches_the_fake_quant_switch_and_writes_in_place(family, mode):
    s, dense_sw, packed_sw = dense_and_packed(family, mode)
    ids = tokens(LOW, 2, 16, seed=9)
    assert close(logits(packed_sw.model, ids), logits(dense_sw.model, ids))
    before = {n: (t.data_ptr(), t.detach().clone()) for n, t in packed_tensors(packed_sw.model).items()}

    new = tokens(NEW, 4, 16, seed=5)
    dense_report, packed_report = dense_sw.switch_to(new), packed_sw.switch_to(new)
    assert packed_report.experts_changed > 0
    assert packed_report.widths == dense_report.widths  # profiling through the packed experts agrees
    assert close(logits(packed_sw.model, ids), logits(dense_sw.model, ids))

    after = packed_tensors(packed_sw.model)
    assert {n: t.data_ptr() for n, t in after.items()} == {n: ptr for n, (ptr, _) in before.items()}  # in place
    moved = {n for n, t in after.items() if not torch.equal(t, before[n][1])}
    assert moved and all(".channels.values_" in n for n in moved)  # codes, scales, zeros, indices untouched

    packed_sw.restore_bq()
    dense_sw.restore_bq()
    assert close(logits(packed_sw.model, ids), logits(dense_sw.model, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_model_saves_and_reloads_with_its_quantization_config(family, tmp_path):
    s, _, packed_sw = dense_and_packed(family)
    packed_sw.switch_to(tokens(NEW, 4, 16, seed=5))  # the saved model holds switched channel rows
    ids = tokens(LOW, 2, 16, seed=9)
    expected = logits(s.model, ids)
    s.model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "dynamo" and sorted(config["layers"]) == [str(i) for i in s.cache.layers]
    reloaded = load_packed(tmp_path).eval()
    assert reloaded.config._experts_implementation == "dynamo_packed"
    saved, loaded = packed_tensors(s.model), packed_tensors(reloaded)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[n], loaded[n]) and saved[n].dtype == loaded[n].dtype for n in saved)
    assert not any(n.endswith(("gate_up_proj", "down_proj")) and ".experts." in n
                   for n, _ in reloaded.named_parameters())  # no dense expert copies
    assert torch.equal(logits(reloaded, ids), expected)

    # the reloaded model switches like the original
    sw = DynamicSwitcher(reloaded, s.plan, s.significance, s.cache, s.allocation,
                         store=PackedChannelStore(reloaded, s.cache))
    sw.restore_bq()
    packed_sw.restore_bq()
    assert torch.equal(logits(reloaded, ids), logits(s.model, ids))


def test_packed_store_refuses_a_cache_it_was_not_packed_with():
    s, _, _ = dense_and_packed("olmoe")
    other = quantized("olmoe", method="fcm", target_bits=3.0)
    first = min(other.cache.index)
    other.cache.index[first]["gate"] = other.cache.index[first]["gate"].flip(1)
    with pytest.raises(UserError, match="not this cache's channels"):
        PackedChannelStore(s.model, other.cache).validate()
    plain = quantized("olmoe", method="fcm", target_bits=3.0, keep_codes=True)
    attach_packed(plain.model, pack_experts(plain.model, plain.codes))  # packed without a cache
    with pytest.raises(UserError, match="keeps no channel rows"):
        PackedChannelStore(plain.model, plain.cache).validate()
    assert len(packed_modules(plain.model)) == len(plain.cache.layers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_packed_model_runs_triton_and_switches_on_the_device():
    s, dense_sw, packed_sw = dense_and_packed("olmoe")
    ids = tokens(LOW, 2, 16, seed=9)
    on_cpu = logits(s.model, ids)
    s.model.to("cuda")
    assert close(logits(s.model, ids.cuda()).cpu(), on_cpu)  # Triton kernels + channel rows on the GPU
    new = tokens(NEW, 4, 16, seed=5)
    assert packed_sw.switch_to(new).widths == dense_sw.switch_to(new).widths
    assert close(logits(s.model, ids.cuda()).cpu(), logits(dense_sw.model, ids))
