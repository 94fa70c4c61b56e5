"""An extension is one file plus one preset: a metric and an allocation rule registered in a file this
test writes reach a run through run.py's overrides (`plugins=[file]`), end to end on the embedded
model, the rule's own setting (`quant.allocation.params`) included; docs/extending.md shows the files
the repository ships for the same purpose."""

from __future__ import annotations

import json
import re
import sys

import pytest

from conftest import REPO

# smaller than experiment=smoke alone: one short window everywhere, RTN (no GPTQ), no FP16 reference
FAST = ["experiment=smoke", "logger=none", "eval=ppl", "eval.datasets=[code]", "eval.max_windows=1",
        "eval.seqlen=128", "eval.reference=false", "analysis.windows=1", "analysis.seqlen=128",
        "analysis.datasets=[code,docs]", "analysis.figures=false", "calib.windows=1", "calib.seqlen=128",
        "quant=dynamo_bq", "quant.method=rtn"]

PLUGIN = '''
from dataclasses import dataclass

from dynamo.registry import register_allocation, register_metric

CALLS = []


@register_metric("test_router_mass", statistic="wsq")
def router_mass(layer, stats, unit):
    CALLS.append(unit)
    return stats.channels[unit]["wsq"].sqrt()


@dataclass
class OneWideParams:
    wide: int = 8


@register_allocation("test_one_wide", needs="significance", params=OneWideParams)
def one_wide(layer, cfg):
    """The expert with the largest share at `wide` bits, the others at the narrowest."""
    top = int(layer.shares.argmax())
    return [layer.params.wide if e == top else min(cfg.widths) for e in range(layer.n_experts)]
'''


def test_a_metric_and_a_rule_from_a_users_file_run_end_to_end(cli, tmp_path):
    plugin = tmp_path / "my_ablation.py"
    plugin.write_text(PLUGIN)
    results = tmp_path / "runs"
    status, _, err = cli(*FAST, f"results_dir={results}", f"plugins=[{plugin}]",
                         "analysis.channel_metric=test_router_mass", "quant.allocation.method=test_one_wide",
                         "+quant.allocation.params.wide=6")  # not its default: the rule got the block's value
    assert status == 0, err[-3000:]
    (record_path,) = results.rglob("result.json")
    record = json.loads(record_path.read_text())
    assert record["quantization"]["allocation"] == "test_one_wide"
    assert record["analysis"]["metric"] == "test_router_mass"
    plan = json.loads((record_path.parent / "plan.json").read_text())
    assert plan["created_by"]["metric"] == "test_router_mass" and plan["created_by"]["params"] == {"wide": 6}
    widths = record["config"]["quant"]["allocation"]["widths"]
    for layer in plan["layers"].values():  # the rule's shape: one expert at `wide`, the rest narrow
        bits = sorted(layer["experts"].values())
        assert bits == [min(widths)] * (len(bits) - 1) + [6], bits
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


def test_the_docs_show_the_shipped_example_file_and_preset_verbatim():
    """docs/extending.md's file blocks are the files its run.py commands use (the docs' command test runs them)."""
    section = (REPO / "docs" / "extending.md").read_text()
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


# --- settings of an entry's own (dynamo.registry.parse_params) ------------------------------------

EXAMPLE = [*(a for a in FAST if not a.startswith("quant=")), "plugins=[experiments/ablation.py]",
           "quant=example_greedy"]


def test_a_typo_in_the_example_rules_setting_is_one_line_before_any_model_work(cli, tmp_path):
    runs = tmp_path / "runs"
    status, _, err = cli(*EXAMPLE, f"results_dir={runs}", "+quant.allocation.params.max_bit=4")
    lines = [x for x in err.splitlines() if x.strip()]
    assert status == 2 and lines == ["error: quant.allocation.params.max_bit: not a parameter of "
                                     "quant.allocation.method=greedy; its parameters: max_bits"], err[-2000:]
    assert not runs.exists() or not any(runs.iterdir())  # refused before a run folder was claimed


@pytest.mark.parametrize("given, message", [
    ({"max_bit": 4}, "quant.allocation.params.max_bit: not a parameter of quant.allocation.method=greedy; "
                     "its parameters: max_bits"),
    ({"max_bits": "abc"}, "quant.allocation.params: Value 'abc' of type 'str' could not be converted to Integer "
                          "(quant.allocation.method=greedy)"),
    ({"max_bits": 1}, "quant.allocation.params: max_bits must be at least 2, got 1 (quant.allocation.method=greedy)"),
])
def test_the_settings_block_is_checked_against_the_rules_dataclass(given, message):
    from omegaconf import OmegaConf

    from dynamo.errors import UserError
    from dynamo.registry import ALLOCATIONS, load_plugins

    load_plugins(["experiments/ablation.py"])
    assert ALLOCATIONS.params_of(OmegaConf.create({"method": "greedy", "params": {}})).max_bits == 8  # the default
    with pytest.raises(UserError) as err:
        ALLOCATIONS.params_of(OmegaConf.create({"method": "greedy", "params": given}))
    assert str(err.value) == message


def test_an_entry_without_settings_refuses_a_block_and_a_required_one_is_asked_for():
    from dataclasses import dataclass

    from omegaconf import OmegaConf

    from dynamo.errors import UserError
    from dynamo.registry import ALLOCATIONS, parse_params

    with pytest.raises(UserError, match=r"^quant.allocation.params: quant.allocation.method=budget takes no "
                                        r"parameters, got temperature$"):
        ALLOCATIONS.params_of(OmegaConf.create({"method": "budget", "params": {"temperature": 0.5}}))

    @dataclass
    class Needs:
        temperature: float

    with pytest.raises(UserError, match=r"^x.params.temperature: rule r needs it \(no default\)"):
        parse_params(Needs, {}, "x.params", "rule r")
    assert parse_params(Needs, {"temperature": 1}, "x.params", "rule r") == Needs(1.0)


def test_the_example_rules_setting_caps_its_widths():
    import torch
    from omegaconf import OmegaConf

    from dynamo.config import AllocationConfig
    from dynamo.quant.allocation import LayerInput, layer_widths
    from dynamo.quant.budget import layer_budget
    from dynamo.registry import ALLOCATIONS, load_plugins

    load_plugins(["experiments/ablation.py"])
    rule = ALLOCATIONS.get("greedy")
    cfg = OmegaConf.merge(OmegaConf.structured(AllocationConfig), {"method": "greedy", "target_bits": 3.0})
    shares = torch.softmax(torch.arange(8, dtype=torch.float64), 0)
    for cap in (8, 4):
        bits = layer_widths(rule, LayerInput(0, 8, shares=shares, params=rule.params(max_bits=cap)), cfg)
        assert max(bits) == cap and sum(bits) <= layer_budget(8, 3.0)  # 8 bits for the top expert fit 3.0 x 8


def test_each_switching_policy_checks_its_own_settings():
    from omegaconf import OmegaConf

    from dynamo.config import AnalysisConfig, QuantConfig
    from dynamo.errors import UserError
    from dynamo.registry import SWITCH_POLICIES

    quant, analysis = OmegaConf.structured(QuantConfig(name="q")), OmegaConf.structured(AnalysisConfig)
    quant.switching.mix, quant.switching.budget_frac = 2.0, 0.0
    with pytest.raises(UserError, match="quant.switching.mix must be in"):
        SWITCH_POLICIES.get("paper").check(quant, analysis)
    with pytest.raises(UserError, match="quant.switching.budget_frac must be in"):
        SWITCH_POLICIES.get("adaptive").check(quant, analysis)


def test_every_table_checks_its_entrys_block_at_start_up():
    """check_names (run.py's preflight, and the pipeline's start) checks the policy's and the quantizer's blocks
    as it does the allocation rule's; a policy declares its settings as a `params` class attribute."""
    from dataclasses import dataclass

    import torch
    from omegaconf import OmegaConf

    from dynamo.errors import UserError
    from dynamo.quant import QSpec
    from dynamo.registry import QUANTIZERS, SWITCH_POLICIES, check_names, register_policy

    @dataclass
    class Window:
        window: int = 4

    if "test_windowed" not in SWITCH_POLICIES.names:
        @register_policy("test_windowed")
        class Windowed:
            params = Window

    def cfg(**switching):
        return OmegaConf.create({"quant": {"method": "rtn", "params": {},
                                           "switching": {"policy": "test_windowed", **switching}}})

    check_names(cfg(params={"window": 8}))
    assert SWITCH_POLICIES.params_of(cfg(params={"window": 8}).quant.switching) == Window(8)
    with pytest.raises(UserError, match=r"^quant.switching.params.windoww: not a parameter of "
                                        r"quant.switching.policy=test_windowed; its parameters: window$"):
        check_names(cfg(params={"windoww": 8}))
    bad_quantizer = cfg(params={})
    bad_quantizer.quant.params = {"damp": 0.1}
    with pytest.raises(UserError, match=r"^quant.params: quant.method=rtn takes no parameters, got damp$"):
        check_names(bad_quantizer)
    _, loss = QUANTIZERS.get("rtn").matrix(torch.ones(2, 8), None, QSpec(4, group_size=8), None)
    assert loss is None  # RTN's per-matrix step reports no loss: apply_plan counts no fallback for it
