"""DynaMo Step 1: channel and expert significance, cross-dataset dynamics, the artifact and its cache."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from dynamo.adapters import moe_layers
from dynamo.analysis import Significance, analyze, channel_significance
from dynamo.registry import METRICS
from dynamo.calibration import capture
from dynamo.config import AllocationConfig, AnalysisConfig, SourceConfig
from dynamo.quant import QSpec, QuantPlan
from dynamo.quant.allocation import allocate
from tiny_families import EXPERTS, FAMILIES, VOCAB, build


def _captures(model, n=2):
    gen = torch.Generator().manual_seed(0)
    # two "datasets": disjoint halves of the vocabulary route differently
    return {f"d{k}": capture(model, torch.randint(k * VOCAB // n, (k + 1) * VOCAB // n, (3, 12), generator=gen),
                             hessians=False) for k in range(n)}


@pytest.mark.parametrize("unit", ["row", "neuron"])
@pytest.mark.parametrize("metric", METRICS.names)
@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_expert_shares_sum_to_one_per_layer(family, metric, unit):
    model = build(family)
    layers = list(moe_layers(model))
    sig = Significance.from_captures(_captures(model), layers, metric, unit)
    for d in sig.datasets:
        for i, shares in sig.expert(d).items():
            assert shares.shape == (EXPERTS,) and torch.all(shares >= 0)
            assert float(shares.sum()) == pytest.approx(1.0)


def _act_l2_of_down_from_scratch(model, layer) -> torch.Tensor:
    """act_l2 of each down-projection row, recomputed from the block's input with our own routing:
    sum over the tokens routed to e of (router probability) * (down output)^2 (OLMoE: softmax,
    top-k, probabilities not renormalised)."""
    seen = {}
    handle = layer.block.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0].detach()))
    gen = torch.Generator().manual_seed(0)  # the first dataset of _captures
    with torch.no_grad():
        model(torch.randint(0, VOCAB // 2, (3, 12), generator=gen))
    handle.remove()
    x = seen["x"].reshape(-1, layer.hidden_size).double()
    probs = torch.softmax(x @ layer.router.weight.double().T, dim=-1)
    top = probs.topk(layer.top_k, dim=-1).indices
    expected = []
    for e in range(layer.n_experts):
        rows = (top == e).any(dim=-1)
        w = {p: layer.weight(e, p).double() for p in ("gate", "up", "down")}
        xe = x[rows]
        y = (torch.nn.functional.silu(xe @ w["gate"].T) * (xe @ w["up"].T)) @ w["down"].T
        expected.append((probs[rows, e][:, None] * y.square()).sum(dim=0))
    return torch.stack(expected)


def test_metrics_follow_their_definitions():
    model = build("olmoe")
    layer = next(iter(moe_layers(model)))
    stats = next(iter(_captures(model).values()))
    routed = stats.layers[layer.index].routed
    act_l2 = channel_significance(stats, [layer], "act_l2", "row")[layer.index]
    torch.testing.assert_close(act_l2["down"], _act_l2_of_down_from_scratch(model, layer), rtol=1e-4, atol=1e-6)
    freq = channel_significance(stats, [layer], "freq", "row")[layer.index]
    assert torch.equal(freq["gate"][:, 0], routed.tokens.double())
    wanda = channel_significance(stats, [layer], "wanda", "row")[layer.index]
    e = int(routed.tokens.argmax())
    expected = layer.weight(e, "up").abs().double() @ routed.channels["input"]["sq"][e].double().sqrt()
    torch.testing.assert_close(wanda["up"][e], expected, rtol=1e-5, atol=1e-6)


def test_dynamic_channels_are_the_ones_that_move_across_datasets():
    base = torch.ones(2, 10, dtype=torch.double)
    moved = base.clone()
    moved[1, 7] = 50.0  # expert 1, channel 7 takes most of its expert's significance on dataset b only
    sig = Significance(metric="act_l2", unit="row", datasets=["a", "b"],
                       channels={"a": {0: {"down": base}}, "b": {0: {"down": moved}}},
                       tokens={d: {0: torch.ones(2)} for d in "ab"},
                       router_weight={d: {0: torch.ones(2)} for d in "ab"})
    picked = sig.dynamic_channels(0.1)[0]["down"]
    assert picked.shape == (2, 1) and int(picked[1, 0]) == 7
    change = sig.expert_change()[0]
    assert change[1] > 0 and change[0] > 0  # expert 1 gained share on b, so expert 0 lost it


def test_significance_round_trips_through_safetensors(tmp_path):
    model = build("qwen2_moe")
    sig = Significance.from_captures(_captures(model), list(moe_layers(model)), "act_abs", "neuron",
                                     meta={"model": "tiny"})
    sig.save(tmp_path / "sig")
    back = Significance.load(tmp_path / "sig")
    assert back.datasets == sig.datasets and back.layers == sig.layers and back.meta == sig.meta
    for d in sig.datasets:
        for i in sig.layers:
            torch.testing.assert_close(back.expert(d)[i], sig.expert(d)[i])


@pytest.mark.parametrize("method", ["budget", "fcm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_dynamo_allocation_fills_every_routed_expert(family, method):
    model = build(family)
    layers = list(moe_layers(model))
    sig = Significance.from_captures(_captures(model), layers, "act_l2", "row")
    plan = QuantPlan(method="gptq", default=QSpec(16, group_size=-1), shared_default=8)
    widths = [8, 6, 4, 3, 2] if method == "budget" else [8, 6, 4, 2]
    cfg = OmegaConf.create({"method": method, "target_bits": 3.0, "widths": widths, "fuse": "mean",
                            "fcm": {"m": 2.0, "eps": 1e-5, "max_iter": 300, "overlap_margin": 0.1}})
    cfg = OmegaConf.merge(OmegaConf.structured(AllocationConfig), cfg)
    allocate(plan, layers, cfg, significance=sig)
    for layer in layers:
        bits = [plan.spec_for(layer.index, e, "gate").bits for e in range(layer.n_experts)]
        assert set(bits) <= set(widths)
        if method == "budget":
            assert sum(bits) <= 3 * layer.n_experts and sum(bits) >= 3 * layer.n_experts - 1
        if layer.shared_expert is not None:
            assert plan.spec_for(layer.index, "shared", "down").bits == 8


def test_analysis_reuses_its_cache(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynamo.config import REPO_ROOT
    from dynamo.tokens import RunTokens

    path = REPO_ROOT / "assets" / "models" / "tiny-olmoe"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    sources = {name: SourceConfig(path=name) for name in ("code", "chat")}
    tokens = RunTokens(tokenizer, sources)
    cfg = OmegaConf.merge(OmegaConf.structured(AnalysisConfig),
                          {"windows": 2, "seqlen": 64, "cache_dir": str(tmp_path / "cache")})
    first, report1 = analyze(model, tokens, ["code", "chat"], cfg, model_path=str(path))
    second, report2 = analyze(model, tokens, ["code", "chat"], cfg, model_path=str(path))
    assert [r["cache"] for r in report1["captures"].values()] == ["miss", "miss"]
    assert [r["cache"] for r in report2["captures"].values()] == ["hit", "hit"]
    for d in first.datasets:
        for i in first.layers:
            torch.testing.assert_close(first.expert(d)[i], second.expert(d)[i])
    # a different sample is a different key, and a changed model is a different key
    _, report3 = analyze(model, tokens, ["code"], OmegaConf.merge(cfg, {"windows": 3}),
                         model_path=str(path))
    assert report3["captures"]["code"]["cache"] == "miss"
    with torch.no_grad():
        next(iter(moe_layers(model))).router.weight.mul_(1.01)
    _, report4 = analyze(model, tokens, ["code"], cfg, model_path=str(path))
    assert report4["captures"]["code"]["cache"] == "miss"


def test_one_dataset_caches_its_most_significant_channels():
    """No cross-dataset variation with one dataset: the channels with the largest share are chosen."""
    channels = torch.ones(2, 10, dtype=torch.double)
    channels[0, 3], channels[1, 8] = 9.0, 5.0
    sig = Significance(metric="act_l2", unit="row", datasets=["a"], channels={"a": {0: {"down": channels}}},
                       tokens={"a": {0: torch.ones(2)}}, router_weight={"a": {0: torch.ones(2)}})
    assert sig.dynamic_channels(0.1)[0]["down"].flatten().tolist() == [3, 8]


@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_a_corrupt_cache_entry_is_recomputed_with_a_warning(tmp_path, caplog, damage):
    from dynamo.analysis import cache

    model = build("olmoe")
    stats = _captures(model, n=1)["d0"]
    key = {"capture_version": 1, "model": "m", "dataset": "d0", "windows": 3, "seqlen": 12, "token_ids": "t",
           "seed": 0}
    folder = cache.store(tmp_path, key, stats, 1.5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "the temporary folder is renamed into place"
    loaded, seconds = cache.load(tmp_path, key)
    assert seconds == 1.5 and loaded.layers.keys() == stats.layers.keys()
    weights = folder / "capture.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    else:  # same size, one byte changed: only the checksum notices
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    assert cache.load(tmp_path, key) is None
    assert "is corrupt" in caplog.text and "recomputing" in caplog.text
    cache.store(tmp_path, key, stats, 2.0)
    assert cache.load(tmp_path, key)[1] == 2.0
