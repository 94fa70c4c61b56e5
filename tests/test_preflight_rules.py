"""Every rule is checked before model work (issue 29): each case below used to fail after the FP16
pass, the analysis or GPTQ (or not at all), and is now one `error:` line, exit 2, no folder, before
the model's weights are loaded."""

from __future__ import annotations

import json
import shutil

import pytest

from test_bad_input import SMOKE, assert_rejected, results, tiered  # noqa: F401  (the fixture)

TINY = "model=local", "eval=ppl", "eval.seqlen=64", "eval.datasets=[code]"


@pytest.fixture
def inputs(tmp_path, tiny_model_dir):
    from conftest import REPO

    dense = tmp_path / "dense"
    shutil.copytree(tiny_model_dir, dense)
    config = json.loads((dense / "config.json").read_text())
    config["model_type"] = "llama"  # a dense family: no MoE adapter
    (dense / "config.json").write_text(json.dumps(config))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"schema_version": 1, "defaults": {"method": "rtn"}, "layers": {}}))
    good = tmp_path / "good.jsonl"
    good.write_text((REPO / "assets/data/code/test.jsonl").read_text())
    short = tmp_path / "short.txt"
    short.write_text("a few words only\n\nand a second short document\n")
    return {"model": tiny_model_dir, "dense": dense, "plan": plan, "good": good, "short": short}


CASES = {
    "slot_bits": (["quant=dynamo_3bit", "quant.switching.slot_bits=4"], "quant.switching.slot_bits=4"),
    "group_size": (["quant=rtn_4bit", "quant.group_size=-2"], "quant.group_size=-2 must be a positive"),
    "bits": (["quant=rtn_4bit", "quant.bits=5"], "quant.bits=5 is not a supported width"),
    "bnb_format": (["quant=bnb_nf4", "quant.bnb_format=fp4"], "unknown quant.bnb_format 'fp4'"),
    "damp_negative": (["quant=gptq_4bit", "quant.damp=-1"], "quant.damp=-1.0 must be > 0"),
    "damp_zero": (["quant=gptq_4bit", "quant.damp=0"], "quant.damp=0.0 must be > 0"),
    "plan_without_bits": (["quant=rtn_4bit", "quant.plan={plan}"], "'defaults' must hold at least 'bits'"),
    "device_meta": (["quant=fp16", "model.device=meta"], "model.device=meta: a meta device holds no weights"),
    "interpolation": (["quant=fp16", "eval.seqlen=${{nope}}"], "eval.seqlen: Interpolation key 'nope' not found"),
    "device_typo": (["quant=fp16", "model.device=gpu0"], "model.device=gpu0 is not a device"),
    "dense_model": (["quant=rtn_4bit", "model.path={dense}"], "no MoE adapter for model_type 'llama'"),
    "calib_is_test_file": (["quant=gptq_4bit", "dataset=local", "dataset.path={good}", "dataset.calib_path={good}",
                            "eval.datasets=null"], "dataset.calib_path is the test file itself"),
}


# about 1.1 s each (a run refused inside Hydra): the fast tier keeps one rule per config node
SLOW_CASES = {"group_size", "bnb_format", "damp_negative", "damp_zero", "plan_without_bits", "device_meta",
              "dense_model"}


def test_the_slow_cases_exist():
    assert SLOW_CASES <= set(CASES), SLOW_CASES - set(CASES)


@pytest.mark.parametrize("case", tiered(CASES, SLOW_CASES))
def test_a_rule_is_checked_before_the_model_is_loaded(case, cli, results, inputs, monkeypatch):  # noqa: F811
    import dynamo.pipeline

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the rule was checked")

    monkeypatch.setattr(dynamo.pipeline, "load_model", no_model)
    overrides, message = CASES[case]
    argv = [*SMOKE, f"results_dir={results}", *TINY, f"model.path={inputs['model']}",
            *[o.format(**inputs) for o in overrides]]
    status, _, err = cli(*argv)
    assert_rejected(status, err, results, message)


def test_a_calib_file_too_short_for_the_analysis_fails_before_the_fp16_pass(cli, results, inputs,  # noqa: F811
                                                                           monkeypatch):
    """dynamo_3bit's analysis needs analysis.seqlen tokens of calib text: refused before any pass runs."""
    import dynamo.pipeline

    def no_pass(*args, **kwargs):
        raise AssertionError("a model pass ran before the calib length was checked")

    monkeypatch.setattr(dynamo.pipeline, "token_perplexity", no_pass)
    status, _, err = cli(*SMOKE, f"results_dir={results}", *TINY, f"model.path={inputs['model']}", "quant=dynamo_3bit",
                         "dataset=local", f"dataset.path={inputs['good']}", f"dataset.calib_path={inputs['short']}",
                         "eval.datasets=null")
    assert_rejected(status, err, results, "less than one window of")


def test_gptq_falling_back_to_rtn_by_itself_is_counted(monkeypatch):
    """quantize_gptq returns RTN (loss NaN) when a Hessian is unusable: the report lists that expert."""
    import torch

    from dynamo.quant import apply, stage
    from dynamo.quant.apply import GPTQOptions, QuantReport, quantize_layer
    from dynamo.quant.plan import QuantPlan
    from dynamo.quant.rtn import quantize_rtn
    from dynamo.quant.spec import QSpec

    class Layer:
        index = 0

    weight = torch.randn(4, 8)
    layer = Layer()
    monkeypatch.setattr(apply, "_expert_matrices", lambda layer, stats: [(1, "gate", weight, torch.eye(8), 100)])
    # the GPTQ step registered for method=gptq (dynamo.quant.stage.gptq_matrix) falling back by itself
    monkeypatch.setattr(stage, "quantize_gptq", lambda w, h, spec, **kw: (quantize_rtn(w, spec), float("nan")))
    plan = QuantPlan(method="gptq", default=QSpec(bits=4, group_size=-1))
    report = QuantReport()
    quantize_layer(layer, plan, None, report, GPTQOptions(), set(), keep_codes=False)
    assert report.rtn_fallback == [(0, 1)]
