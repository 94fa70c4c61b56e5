"""An extension is one file plus one preset: a metric and an allocation rule registered in a file this
test writes reach a run through run.py's overrides (`plugins=[file]`), end to end on the embedded
model; README "Write your own ablation" shows the files the repository ships for the same purpose."""

from __future__ import annotations

import json
import re
import sys

from conftest import REPO

# smaller than experiment=smoke alone: one short window everywhere, RTN (no GPTQ), no FP16 reference
FAST = ["experiment=smoke", "logger=none", "eval=ppl", "eval.datasets=[code]", "eval.max_windows=1",
        "eval.seqlen=128", "eval.reference=false", "analysis.windows=1", "analysis.seqlen=128",
        "analysis.datasets=[code,docs]", "analysis.figures=false", "calib.windows=1", "calib.seqlen=128",
        "quant=dynamo_bq", "quant.method=rtn"]

PLUGIN = '''
from dynamo.registry import register_allocation, register_metric

CALLS = []


@register_metric("test_router_mass", statistic="wsq")
def router_mass(layer, stats, unit):
    CALLS.append(unit)
    return stats.channels[unit]["wsq"].sqrt()


@register_allocation("test_one_wide", needs="significance")
def one_wide(layer, cfg):
    """The expert with the largest share at the widest width, the others at the narrowest."""
    top = int(layer.shares.argmax())
    return [max(cfg.widths) if e == top else min(cfg.widths) for e in range(layer.n_experts)]
'''


def test_a_metric_and_a_rule_from_a_users_file_run_end_to_end(cli, tmp_path):
    plugin = tmp_path / "my_ablation.py"
    plugin.write_text(PLUGIN)
    results = tmp_path / "runs"
    status, _, err = cli(*FAST, f"results_dir={results}", f"plugins=[{plugin}]",
                         "analysis.channel_metric=test_router_mass", "quant.allocation.method=test_one_wide")
    assert status == 0, err[-3000:]
    (record_path,) = results.rglob("result.json")
    record = json.loads(record_path.read_text())
    assert record["quantization"]["allocation"] == "test_one_wide"
    assert record["analysis"]["metric"] == "test_router_mass"
    plan = json.loads((record_path.parent / "plan.json").read_text())
    assert plan["created_by"]["metric"] == "test_router_mass"
    widths = record["config"]["quant"]["allocation"]["widths"]
    for layer in plan["layers"].values():  # the rule's shape: one expert wide, the rest narrow
        bits = sorted(layer["experts"].values())
        assert bits == [min(widths)] * (len(bits) - 1) + [max(widths)], bits
    module = sys.modules["dynamo_plugin_my_ablation"]
    assert set(module.CALLS) == {"gate", "up", "down"}  # the row unit's projections, through the metric
    assert record["config"]["plugins"] == [str(plugin)]


def test_a_plugin_name_without_its_plugin_is_one_line_that_says_so(cli, tmp_path):
    status, _, err = cli(*FAST, f"results_dir={tmp_path / 'runs'}", "quant.allocation.method=test_not_there")
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert status == 2 and "quant.allocation.method: Invalid value 'test_not_there', expected one of [uniform, " \
        "moeptq, random, fcm, budget" in line and "plugins=[" in line
    status, _, err = cli(*FAST, f"results_dir={tmp_path / 'runs'}", f"plugins=[{tmp_path / 'nope.py'}]")
    assert status == 2 and "nope.py is not a file" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_readme_shows_the_shipped_example_file_and_preset_verbatim():
    """The README's "Write your own ablation" blocks are the files its run.py command uses
    (tests/test_readme.py runs that command)."""
    section = (REPO / "docs" / "extending.md").read_text().split("## Write your own ablation", 1)[1].split("\n## ", 1)[0]
    blocks = dict(re.findall(r"```\w+\n# (\S+)\n(.*?)```", section, re.DOTALL))
    assert set(blocks) == {"experiments/ablation.py", "conf/quant/example_greedy.yaml"}
    for path, text in blocks.items():
        assert (REPO / path).read_text() == text, path
    assert "python run.py plugins=[experiments/ablation.py] quant=example_greedy" in section


def test_a_metric_with_a_statistic_of_its_own_needs_no_edit_to_the_capture(tmp_path):
    """register_statistic: captures made for the metric keep the new running sum (checked against the
    built-in sums it restates), it survives save/load, and the analysis cache keys such captures apart."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import tiny_olmoe_config
    from dynamo.adapters import moe_layers
    from dynamo.analysis import channel_significance
    from dynamo.analysis.cache import capture_key
    from dynamo.analysis.significance import statistics_for
    from dynamo.calibration import CalibrationStats, capture
    from dynamo.registry import METRICS, register_metric, register_statistic

    if "test_sq_again" not in METRICS.names:
        register_statistic("test_sq_again")(torch.square)
        register_statistic("test_wabs_again", weighted=True)(torch.abs)
        register_metric("test_sq_again_metric", statistic="test_sq_again")(
            lambda layer, stats, unit: stats.channels[unit]["test_sq_again"])
    assert statistics_for("test_sq_again_metric") == ("test_sq_again",) and statistics_for("act_l2") == ()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_olmoe_config(64)).eval()
    windows = torch.randint(2, 64, (3, 12), generator=torch.Generator().manual_seed(0))
    stats = capture(model, windows, hessians=False, statistics=("test_sq_again", "test_wabs_again"))
    stats.save(tmp_path / "capture")
    loaded = CalibrationStats.load(tmp_path / "capture")
    for s in (stats, loaded):
        for layer in s.layers.values():
            for unit, sums in layer.routed.channels.items():
                torch.testing.assert_close(sums["test_sq_again"], sums["sq"], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(sums["test_wabs_again"], sums["wabs"], rtol=1e-5, atol=1e-6)
    layers = list(moe_layers(model))
    ours = channel_significance(loaded, layers, "test_sq_again_metric", "row")
    for i, units in ours.items():
        for unit, t in units.items():
            torch.testing.assert_close(t, stats.layers[i].routed.channels[unit]["sq"].double())
    plain, extra = (capture_key("f", "d", windows, 0, s) for s in ((), ("test_sq_again",)))
    assert "statistics" not in plain and extra["statistics"] == ["test_sq_again"]


def test_tables_list_built_ins_in_a_fixed_order_and_refuse_a_second_entry_of_a_name():
    import pytest

    from dynamo.errors import UserError
    from dynamo.registry import ALLOCATIONS, QUANTIZERS, register_allocation

    assert ALLOCATIONS.names[:5] == ("uniform", "moeptq", "random", "fcm", "budget")
    assert QUANTIZERS.names == ("none", "rtn", "gptq", "bnb")
    with pytest.raises(ValueError, match="'budget' is already registered"):
        register_allocation("budget")(lambda layer, cfg: None)
    with pytest.raises(ValueError, match="needs must be one of"):
        register_allocation("test_bad_needs", needs="everything")
    with pytest.raises(UserError, match=r"quant.allocation.method: Invalid value 'fcmm'"):
        ALLOCATIONS.get("fcmm")
