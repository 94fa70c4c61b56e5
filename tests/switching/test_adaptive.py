"""The adaptive switch: slots chosen per dataset under one byte budget, restored from the FP16 master, atomic."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

import dynamo.switching.targets as targets_module
from switching_setup import HIGH, LOW, VOCAB, quantized, state, tokens

from dynamo.adapters import PROJECTIONS, moe_layers
from dynamo.config import SwitchingConfig
from dynamo.errors import UserError
from dynamo.quant import QSpec, quantize_rtn
from dynamo.registry import SWITCH_POLICIES
from dynamo.switching.adaptive import AdaptiveSwitcher, ExpertMaster

FAMILIES = ["olmoe", "qwen2_moe"]


def setup(family: str, **kwargs):
    s = quantized(family)
    fp16 = copy.deepcopy(s.model)
    fp16.load_state_dict(s.fp16_state)
    return s, fp16, AdaptiveSwitcher(s.model, s.plan, ExpertMaster(fp16), **kwargs)


def slot_positions(sw: AdaptiveSwitcher) -> dict:
    """Per matrix key: the (rows, cols, low-rank product or None) the active slot set covers, or "full" for a
    raised expert."""
    out = {k: "full" for k in sw.slots.experts8}
    for i, table in sw.slots.tables.items():
        for (p, kind), g in table.groups.items():
            for e in torch.unique(g.expert).tolist():
                rows, cols, _ = out.setdefault((i, e, p), (set(), set(), None))
                if kind == "lowrank":
                    a, bt = g.factors(e)
                    out[(i, e, p)] = (rows, cols, bt.T @ a)
                else:
                    (rows if kind == "rows" else cols).update(g.index[g.expert == e].tolist())
    return out


def chosen_pieces(sw: AdaptiveSwitcher) -> tuple[dict, dict]:
    """Where the active slots are and which matrices take low-rank components (not the values), and the counts."""
    where = {k: v if v == "full" else (v[0], v[1], v[2] is not None) for k, v in slot_positions(sw).items()}
    return where, sw.slots.counts()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("candidates", ["rows_cols", "experts8", "lowrank", "all"])
def test_switch_restores_master_values_into_chosen_slots_only_within_budget(family, candidates):
    s, fp16, sw = setup(family, budget_frac=0.05, candidates=candidates, slot_bits=16)  # fp16 deltas
    bq = {(layer.index, e, p): layer.weight(e, p).clone() for layer in moe_layers(s.model)
          for e in range(layer.n_experts) for p in PROJECTIONS}
    report = sw.switch_to(tokens(HIGH, 2, 12, 5))
    assert sw.slots is not None and 0 < report.extra_nbytes <= report.budget_nbytes == sw.budget_nbytes
    where = slot_positions(sw)
    for key, w in bq.items():
        now, master = sw.weight(key), sw.master.get(key).float()
        if key not in where:
            assert torch.equal(now, w), key
            continue
        if where[key] == "full":
            assert torch.equal(now, quantize_rtn(master, QSpec(8, s.plan.default.group_size)).dequantize()), key
            continue
        rows, cols, product = where[key]
        rows, cols = sorted(rows), sorted(cols)
        untouched = torch.ones_like(w, dtype=torch.bool)
        untouched[rows] = False
        untouched[:, cols] = False
        if product is None:
            assert torch.equal(now[untouched], w[untouched]), key
        else:  # BQ + B A where no row or column slot overwrote it (fp16 factors: their rounding)
            assert torch.allclose(now[untouched], (w + product)[untouched], rtol=0,
                                  atol=2 ** -10 * float(product.abs().max()) + 1e-6), key
            assert not torch.allclose(now, w), key
        # a restored slice holds the master's values up to the fp16 rounding of its delta
        scale = float((master - w).abs().max()) * 2 ** -10 + 1e-7
        assert torch.allclose(now[:, cols], master[:, cols], rtol=0, atol=scale), key
        assert torch.allclose(now[rows], master[rows], rtol=0, atol=2 * scale), key
    counts = report.slots
    if candidates == "rows_cols":
        assert counts["experts8"] == 0 and counts["rows"] + counts["columns"] > 0
    if candidates == "experts8":
        assert counts["experts8"] > 0 and counts["rows"] + counts["columns"] + counts["lowrank"] == 0
    if candidates == "lowrank":
        assert counts["lowrank"] > 0 and counts["rows"] + counts["columns"] + counts["experts8"] == 0
    assert report.exact_bits > sum(s.plan.spec_for(*k).bits * w.numel() for k, w in bq.items()) / \
        sum(w.numel() for w in bq.values())


def weighted_error(sw: AdaptiveSwitcher, stats) -> float:
    """sum over expert matrices of tr(D H D^T), D = W_fp16 - W_model, H the routed inputs' X^T X
    (the random test models' logits move at float noise, ~1e-11, so the experts' own output
    error is what can be checked)."""
    total = 0.0
    for (i, e, p), master in sw.master.weights.items():
        routed = stats.layers[i].routed
        h = (routed.hessian_mid if p == "down" else routed.hessian_in)[e].double()
        d = master.double() - sw.weight((i, e, p)).double()
        total += float(torch.einsum("ri,ij,rj->", d, h, d))
    return total


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("slot_bits", [16, 8])
def test_the_switch_lowers_the_experts_output_error_on_its_data(family, slot_bits):
    from dynamo.calibration import capture

    s, _, sw = setup(family, budget_frac=0.05, slot_bits=slot_bits)
    ids = tokens(LOW, 2, 12, 7)
    stats = capture(s.model, ids, hessians=True, hessian_weighting="router")
    before = weighted_error(sw, stats)
    report = sw.switch_to(ids)
    assert report.expected_reduction > 0  # an estimate: overlapping rows and columns count twice
    assert weighted_error(sw, stats) < 0.8 * before


@pytest.mark.parametrize("family", FAMILIES)
def test_restore_bq_is_bit_identical_after_several_switches(family):
    s, _, sw = setup(family, budget_frac=0.05)
    bq = state(s.model)
    sw.switch_to(tokens(LOW, 2, 12, 1))
    sw.switch_to(tokens(HIGH, 2, 12, 2))
    sw.restore_bq()
    assert all(torch.equal(v, bq[k]) for k, v in s.model.state_dict().items())
    assert sw.slots is None and sw.extra_nbytes() == 0


def test_a_failed_switch_leaves_the_model_bit_identical(monkeypatch):
    s, _, sw = setup("olmoe", budget_frac=0.05)
    sw.switch_to(tokens(LOW, 2, 12, 1))
    before, slots = state(s.model), sw.slots
    calls = {"n": 0}
    real = targets_module._write_matrix

    def failing(weight, change):
        calls["n"] += 1
        if calls["n"] > 3:   # after the old slots were undone and a few new matrices written
            raise RuntimeError("device write failed")
        real(weight, change)

    monkeypatch.setattr(targets_module, "_write_matrix", failing)
    with pytest.raises(RuntimeError, match="device write failed"):
        sw.switch_to(tokens(HIGH, 2, 12, 2))
    assert calls["n"] > 3
    assert all(torch.equal(v, before[k]) for k, v in s.model.state_dict().items())
    assert sw.slots is slots
    sw.restore_bq()  # the way back still works after the failure
    assert all(torch.equal(v, state(s.model)[k]) for k, v in s.model.state_dict().items())


@pytest.mark.parametrize("bad,message", [
    (torch.empty(0, 4, dtype=torch.long), "non-empty"),
    (torch.full((1, 4), VOCAB), "outside the model's vocabulary"),
    (torch.zeros(1, 4), "integer token ids"),
])
def test_bad_input_is_refused_and_changes_nothing(bad, message):
    s, _, sw = setup("olmoe")
    before = state(s.model)
    with pytest.raises(UserError, match=message):
        sw.switch_to(bad)
    assert all(torch.equal(v, before[k]) for k, v in s.model.state_dict().items())


def test_bad_setups_are_refused():
    s, fp16, _ = setup("olmoe")
    with pytest.raises(UserError, match="candidates"):
        AdaptiveSwitcher(s.model, s.plan, ExpertMaster(fp16), candidates="neurons")
    with pytest.raises(UserError, match="budget_frac"):
        AdaptiveSwitcher(s.model, s.plan, ExpertMaster(fp16), budget_frac=0.0)


def test_policies_are_one_table_and_the_config_default_is_in_it():
    assert list(SWITCH_POLICIES.names) == ["adaptive", "paper"]
    assert OmegaConf.structured(SwitchingConfig).policy == "adaptive"
    for name in SWITCH_POLICIES.names:
        assert SWITCH_POLICIES.get(name).name == name
    with pytest.raises(UserError, match=r"quant.switching.policy: Invalid value 'oracle', expected one of \[adaptive, paper\]"):
        SWITCH_POLICIES.get("oracle")


def test_8_bit_slots_fit_more_rows_and_restore_exactly():
    s, fp16, sw16 = setup("olmoe", budget_frac=0.05, candidates="rows_cols", slot_bits=16)
    bq = state(s.model)
    sw8 = AdaptiveSwitcher(s.model, s.plan, sw16.master, budget_frac=0.05, candidates="rows_cols", slot_bits=8)
    ids = tokens(HIGH, 2, 12, 3)
    n16 = sum(sw16.switch_to(ids).slots.values())
    sw16.restore_bq()
    report = sw8.switch_to(ids)
    # (about twice as many at real row lengths; here rows hold 8-16 values, so group scales weigh more)
    assert report.extra_nbytes <= sw8.budget_nbytes and sum(report.slots.values()) > n16
    for table in sw8.slots.tables.values():
        for group in table.groups.values():
            assert group.bits == 8 and group.codes.dtype == torch.uint8
    sw8.restore_bq()
    assert all(torch.equal(v, bq[k]) for k, v in s.model.state_dict().items())


def test_the_streaming_choice_is_the_global_prefix_and_the_greedy_skips_what_no_longer_fits():
    """Merging layer by layer and cutting at the budget each time keeps exactly the global best prefix; the
    greedy fill equals a plain sequential greedy (take if it fits, else skip)."""
    from dynamo.switching.adaptive import Candidates

    gen = torch.Generator().manual_seed(0)
    layers = []
    for i in range(5):
        n = 200
        layers.append(Candidates.of(torch.rand(n, generator=gen), 1, i, 0, 0, 0, torch.arange(n)))
        layers[-1].cost = torch.randint(10, 40, (n,), generator=gen)
    budget = 900
    running = None
    for part in layers:
        running = (part if running is None else Candidates.cat([running, part])).best_within(budget)
    whole = Candidates.cat(layers).best_within(budget)
    key = lambda c: sorted(zip(c.layer.tolist(), c.index.tolist()))  # noqa: E731
    assert key(running) == key(whole) and int(whole.cost.sum()) <= budget
    everything = Candidates.cat(layers)
    everything.cost[::7] = 300  # a few big pieces (whole experts), so the greedy must skip and go on
    ranked = everything.ranked()
    left, expected = budget, []
    for j in range(len(ranked)):
        if int(ranked.cost[j]) <= left:
            left -= int(ranked.cost[j])
            expected.append((int(ranked.layer[j]), int(ranked.index[j])))
    greedy = everything.greedy_within(budget)
    assert key(greedy) == sorted(expected) and len(expected) > len(everything.best_within(budget))
    # the switch's running set (each kind's best 2 x budget, merged layer by layer) loses none of the greedy's
    # choice, even when a kind of big pieces ranks high
    everything.kind[::7] = 2
    running = None
    for i in range(5):
        part = everything.take(everything.layer == i)
        running = (part if running is None else Candidates.cat([running, part])).best_of_each_kind(2 * budget)
    assert key(running.greedy_within(budget)) == key(everything.greedy_within(budget))


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_scoring_picks_the_float64_set(family):
    s, _, sw = setup(family, budget_frac=0.05)
    ids = tokens(HIGH, 2, 12, 5)
    sw.switch_to(ids)
    chosen32 = chosen_pieces(sw)
    sw.restore_bq()
    sw.score_dtype = torch.float64
    sw.switch_to(ids)
    assert chosen_pieces(sw) == chosen32 and chosen32[1]["lowrank"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_master_read_by_slice_from_disk_restores_what_the_host_copy_does(tmp_path, family):
    from dynamo.switching.master import DiskMaster

    s, fp16, host = setup(family, budget_frac=0.05)
    fp16.save_pretrained(tmp_path)  # transformers' own layout on disk (per-expert or fused names)
    disk = DiskMaster(tmp_path, s.model)
    assert disk.nbytes == 0 and disk.fp16_nbytes == host.master.fp16_nbytes
    for key in host.master.keys():
        assert torch.equal(disk.get(key).float(), host.master.get(key).float()), key
    ids = tokens(HIGH, 2, 12, 5)
    host.switch_to(ids)
    chosen = chosen_pieces(host)
    host.restore_bq()
    from_disk = AdaptiveSwitcher(s.model, s.plan, disk, budget_frac=0.05)
    from_disk.switch_to(ids)
    assert chosen_pieces(from_disk) == chosen and from_disk.summary()["master_location"] == f"disk:{tmp_path}"
    with pytest.raises(UserError, match="needs a local checkpoint folder with safetensors"):
        DiskMaster(tmp_path / "nowhere", s.model)
