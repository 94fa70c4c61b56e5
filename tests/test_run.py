"""End to end: `python run.py` on the embedded model. The smoke run is one real process shared by the
session (conftest.smoke_run); the other runs go through run.py's command line in this process. Bad input
is tests/test_bad_input.py's, but for one case from a real process."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO

DOMAINS = {"code", "docs", "speeches", "literature", "email", "legal", "math", "chat"}


def run_py(*overrides: str, results_dir) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "run.py", f"results_dir={results_dir}", "logger=none", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def records(results_dir):
    return sorted(results_dir.rglob("result.json"))


@pytest.fixture
def run(cli):
    """run_py in this process (conftest.cli: no interpreter start, no imports again); the smoke run and one
    bad input below stay real processes."""
    def call(*overrides: str, results_dir) -> subprocess.CompletedProcess:
        status, out, err = cli(f"results_dir={results_dir}", "logger=none", *overrides)
        return subprocess.CompletedProcess(["run.py", *overrides], status, out, err)

    return call


# The tests below read one smoke run shared by the session (conftest.smoke_run; slow by that fixture).


def test_smoke_record_holds_every_domain_and_prints_the_recorded_numbers(smoke_run):
    record = smoke_run.record
    assert set(record["metrics"]["ppl"]) == DOMAINS
    for name, ppl in record["metrics"]["ppl"].items():
        assert math.isfinite(ppl) and 1 < ppl < 8192, name
        assert f"{ppl:.3f}" in smoke_run.stdout, "the printed table must show the recorded number"
        protocol = record["protocol"]["ppl"][name]
        assert protocol["seqlen"] == 512 and protocol["windows"] == 4 and protocol["split"] == "test"
    assert record["model"]["class"] == "Qwen2MoeForCausalLM"
    assert record["config"]["model"]["name"] == "testbed-qwen-moe" and len(record["config_hash"]) == 16
    assert record["versions"]["transformers"] and record["device"]["type"] == "cpu"
    assert (smoke_run.folder / ".hydra" / "config.yaml").is_file()


def test_smoke_lm_eval_scores_every_task_and_keeps_each_question(smoke_run):
    lm_eval = smoke_run.record["metrics"]["lm_eval"]
    assert {f"dynamo_{d}" for d in DOMAINS} | {"dynamo_math_mc"} == set(lm_eval)
    assert 0.0 <= lm_eval["dynamo_math_mc"]["acc"] <= 1.0
    per_question = json.loads((smoke_run.folder / "mc_correct.json").read_text())["dynamo_math_mc"]
    assert len(per_question["acc"]) == 3, "experiment=smoke scores eval.lm_eval.limit=3 questions"
    assert sum(per_question["acc"]) / len(per_question["acc"]) == pytest.approx(lm_eval["dynamo_math_mc"]["acc"])


def test_the_default_is_dynamo_bq_with_its_analysis_and_fp16_reference(smoke_run):
    record = smoke_run.record
    assert record["quant"]["name"] == "dynamo_3bit" and record["metrics"]["avg_bits"]["experts_codes_only"] <= 3.0
    assert set(record["metrics"]["ppl_fp16"]) == DOMAINS
    analysis, timings = record["analysis"], record["timings"]
    assert analysis["datasets"] == ["code", "docs", "speeches", "literature"]
    assert {c["cache"] for c in analysis["captures"].values()} == {"miss"}, "the fixture gives the run a fresh cache"
    # The share of the offline stage, checked against clocks the share is not computed from: the captures run
    # inside the analysis stage (timed around it), so the share is at most that stage's share of analysis +
    # quantization. Each figure is rounded to 1 ms, hence the slack.
    slack = 1e-3 * (len(analysis["captures"]) + 1)
    assert 0 < analysis["capture_s"] <= timings["analysis_s"] + slack
    assert 0 < analysis["share_of_offline"] <= timings["analysis_s"] / (timings["analysis_s"] + timings["quantize_s"]) \
        + slack
    assert f"{analysis['share_of_offline']:.1%} of the offline stage" in smoke_run.stdout


def test_smoke_record_measures_fidelity_to_fp16_per_window(smoke_run):
    metrics = smoke_run.record["metrics"]
    for key in ("kl", "kl_bq", "top1_agree", "top1_agree_bq"):
        assert set(metrics[key]) == DOMAINS, key
    assert all(0 < metrics["kl_bq"][d] < 1 and 0.5 < metrics["top1_agree_bq"][d] <= 1 for d in DOMAINS)
    for name, key in (("window_kl.json", "kl"), ("window_kl_bq.json", "kl_bq")):
        per_window = json.loads((smoke_run.folder / name).read_text())
        assert {d: sum(v) / len(v) for d, v in per_window.items()} == pytest.approx(metrics[key])
        assert all(len(v) == 4 for v in per_window.values())


def test_smoke_run_switches_adaptively_within_its_budget_and_writes_its_artifacts(smoke_run):
    switching = smoke_run.record["switching"]
    assert switching["policy"] == "adaptive"
    assert 0 < max(s["extra_nbytes"] for s in switching["switches"].values()) \
        <= switching["budget_nbytes"] <= 0.011 * switching["expert_fp16_nbytes"]
    for name in ("plan.json", "significance.safetensors", "window_nll.json", "window_nll_fp16.json",
                 "figures/significance.png", "figures/expert_change.png", "figures/bit_map.png"):
        assert (smoke_run.folder / name).is_file(), name


@pytest.mark.slow
def test_bad_input_from_a_real_process_is_one_line_exit_2_and_leaves_nothing(tmp_path):
    """The command line as a user runs it: the exit status and stderr of the process itself. Every other
    bad input is checked in process (tests/test_bad_input.py), which is what run.py's __main__ returns."""
    results = tmp_path / "runs"
    proc = run_py("model=nope", results_dir=results)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown model 'nope'; choose one of:" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not results.exists() or not any(results.iterdir()), "a rejected run left a folder behind"


@pytest.mark.slow
@pytest.mark.parametrize("model,top_k,layers", [("tiny-olmoe", 4, 4), ("tiny-qwen-moe", 2, 4)])
def test_calibration_stage_records_coverage_on_both_embedded_models(run, tmp_path, model, top_k, layers):
    proc = run(f"model={model}", "experiment=smoke", "eval=ppl", "eval.datasets=[chat]", "calib.enabled=true",
                  "calib.windows=2", "calib.seqlen=128", "calib.min_tokens=1000000", "calib.policy=rtn_fallback",
                  results_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = records(tmp_path)
    calibration = json.loads(path.read_text())["calibration"]
    assert calibration["datasets"] == ["code", "docs", "speeches", "literature"]
    assert len(calibration["layers"]) == layers
    for layer in calibration["layers"].values():
        # every calibration token reaches top_k experts: 4 datasets x 2 windows x 128 tokens
        assert sum(layer["tokens"]) == 4 * 2 * 128 * top_k
    # min_tokens above any count: every expert is marked for the RTN fallback
    assert len(calibration["rtn_fallback"]) == layers * 16
    coverage = (path.parent / "coverage.txt").read_text()
    assert "routed calibration tokens per expert" in coverage and coverage.splitlines()[0] in proc.stdout
    assert json.loads((path.parent / "coverage.json").read_text())["layers"] == calibration["layers"]


@pytest.mark.slow
def test_rtn_run_records_bit_accounting_and_the_plan(run, tmp_path):
    proc = run("experiment=smoke", "eval=ppl", "quant=rtn_4bit", "eval.datasets=[code]", results_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = records(tmp_path)
    record = json.loads(path.read_text())
    bits = record["metrics"]["avg_bits"]
    assert bits["experts"] == pytest.approx(4 + (16 + 4) / 128) and bits["experts_codes_only"] == 4.0
    assert 4 < bits["all"] < 16
    assert record["quantization"]["method"] == "rtn" and record["quant"]["name"] == "rtn_4bit"
    plan = json.loads((path.parent / "plan.json").read_text())
    assert plan["defaults"] == {"method": "rtn", "bits": 4, "group_size": 128, "sym": False}
    assert "avg bits: routed experts 4.156" in proc.stdout


@pytest.mark.slow
def test_exported_packed_model_reloads_and_evaluates_like_the_bq_model(run, tmp_path):
    """quant.export=packed writes a transformers checkpoint of the packed BQ model; model=local evaluates it."""
    proc = run("experiment=smoke", "eval=ppl", "eval.datasets=[code,chat]", "quant.export=packed",
                  "quant.switching.policy=paper", results_dir=tmp_path / "bq")  # its channel rows are packed
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = records(tmp_path / "bq")
    record = json.loads(path.read_text())
    export, packed = record["export"], path.parent / "packed_model"
    assert abs(export["expert_nbytes_over_accounting"] - 1) <= 0.02 and export["channel_rows_nbytes"] > 0
    config = json.loads((packed / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "dynamo" and config["model_type"] == "dynamo_packed"
    assert not list(path.parent.glob(".packed_model*")), "the temporary export folder was left behind"
    assert "load_packed" in (packed / "README.md").read_text()

    # the export carries its source's training record: reloaded, it is evaluated on BOS-led windows as
    # the testbed was trained, and plain windows are refused rather than scored off-protocol
    assert (packed / "training.json").read_bytes() == (REPO / "assets" / "models" / "testbed-qwen-moe" /
                                                       "training.json").read_bytes()
    proc = run("experiment=smoke", "eval=ppl", "model=local", f"model.path={packed}", "quant=fp16",
                  results_dir=tmp_path / "plain")
    assert proc.returncode == 2 and "set model.bos_windows=true" in proc.stderr, proc.stderr[-3000:]
    proc = run("experiment=smoke", "eval=ppl", "eval.datasets=[code,chat]", "model=local",
                  f"model.path={packed}", "model.bos_windows=true", "quant=fp16", results_dir=tmp_path / "packed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (packed_path,) = records(tmp_path / "packed")
    ppl = json.loads(packed_path.read_text())["metrics"]["ppl"]
    for name, bq in record["metrics"]["ppl_bq"].items():  # only the fp16 rounding of the group scales differs
        assert abs(ppl[name] / bq - 1) <= 1e-3, (name, ppl[name], bq)

    proc = run("experiment=smoke", "eval=ppl", "model=local", f"model.path={packed}", "model.bos_windows=true",
                  "quant=rtn_4bit", results_dir=tmp_path / "again")
    assert proc.returncode == 2 and "already quantized" in proc.stderr


@pytest.mark.slow
def test_stream_mode_switches_once_per_change_of_dataset(run, tmp_path):
    proc = run("experiment=smoke", "eval=stream", "eval.datasets=[code,chat]", results_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = records(tmp_path)
    record = json.loads(path.read_text())
    segments = record["metrics"]["stream"]["segments"]
    assert [s["dataset"] for s in segments] == ["code", "chat", "code", "chat"]
    assert segments[0]["switches"] == []  # the first segment is the detector's reference
    for segment in segments[1:]:
        assert len(segment["switches"]) == 1 and segment["latency"] <= 8, segment
        # KL to FP16 over the stream, before and after the switch the detector fired
        assert 0 < segment["kl_before_switch"] < 1 and 0 < segment["kl_after_switch"] < 1, segment
    assert all(len(s["window_kl"]) == 32 and 0 < s["kl"] < 1 for s in segments)
    assert set(record["metrics"]["ppl_bq"]) == {"code", "chat"} and record["switching"]["policy"] == "adaptive"


@pytest.mark.slow
def test_paper_policy_runs_with_its_channel_cache(run, tmp_path):
    proc = run("experiment=smoke", "quant=dynamo_paper", "eval=ppl", "eval.datasets=[chat]", results_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = records(tmp_path)
    record = json.loads(path.read_text())
    assert record["switching"]["policy"] == "paper" and record["switching"]["mix"] == 1.0
    assert record["switching"]["cache"]["nbytes"] > 0 and (path.parent / "channel_cache.safetensors").is_file()
    assert set(record["metrics"]["kl"]) == set(record["metrics"]["kl_bq"]) == {"chat"}


@pytest.mark.slow
def test_dequantized_export_of_a_dqs_run_is_the_switched_model_any_tool_loads(run, tmp_path):
    """quant.export=dequantized quant.export_dataset=chat: a plain transformers checkpoint that, loaded with
    AutoModelForCausalLM alone, gives the run's chat PPL (measured after DQS switched to chat)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynamo.config import SourceConfig
    from dynamo.data import load_documents
    from dynamo.eval.perplexity import make_windows, token_perplexity, tokenize_corpus

    proc = run("experiment=smoke", "eval=ppl", "eval.datasets=[chat]", "quant.export=dequantized",
                  "quant.export_dataset=chat", results_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = records(tmp_path)
    record = json.loads(path.read_text())
    export = path.parent / "dequantized_model"
    assert record["export"]["switched_to"] == "chat" and record["export"]["switch"]["chat"]["experts_changed"] >= 0
    config = json.loads((export / "config.json").read_text())
    assert "quantization_config" not in config and config["dynamo_export"]["switched_to"] == "chat"
    assert "No memory saving" in (export / "README.md").read_text()
    assert not list(path.parent.glob(".dequantized_model*")), "the temporary export folder was left behind"

    model = AutoModelForCausalLM.from_pretrained(export).eval()  # no project code involved in loading
    assert model.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(export)
    protocol = record["protocol"]["ppl"]["chat"]
    source = SourceConfig(path="chat")
    ids = tokenize_corpus(tokenizer, load_documents(source, "test"), source.separator)
    windows = make_windows(ids, protocol["seqlen"], protocol["windows"], bos_id=protocol["bos_id"])  # as evaluated
    assert (export / "training.json").is_file(), "the export carries its source's training record"
    ppl = token_perplexity(model, windows, batch_size=4).ppl
    assert ppl == pytest.approx(record["metrics"]["ppl"]["chat"], rel=1e-5)
    assert ppl != pytest.approx(record["metrics"]["ppl_bq"]["chat"], rel=1e-5)  # the switch is in the weights


@pytest.mark.slow
def test_an_adaptive_packed_export_carries_its_slot_sets_and_reloads_switching_by_name(run, tmp_path):
    """quant.export=packed of the default (adaptive) DQS writes each evaluated dataset's slot set; quant=packed_dqs
    serves the reloaded packed model with them and gives the run's BQ + DQS perplexities again."""
    proc = run("experiment=smoke", "eval=ppl", "eval.datasets=[code,chat]", "quant.export=packed",
                  results_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = records(tmp_path / "run")
    record = json.loads(path.read_text())
    packed = path.parent / "packed_model"
    assert record["export"]["slot_sets"]["names"] == ["chat", "code"]
    index = json.loads((packed / "slot_sets" / "index.json").read_text())
    assert sorted(index["sets"]) == ["chat", "code"] and index["sets"]["chat"]["dataset"] == "chat"
    assert index["sets"]["chat"]["device_nbytes"] <= index["sets"]["chat"]["budget_nbytes"]

    proc = run("experiment=smoke", "eval=ppl", "eval.datasets=[code,chat]", "model=local", f"model.path={packed}",
                  "model.bos_windows=true", "quant=packed_dqs", results_dir=tmp_path / "reload")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (reloaded,) = records(tmp_path / "reload")
    again = json.loads(reloaded.read_text())
    switches = again["switching"]["switches"]
    assert all(s["source"] == name and s["profile_s"] == 0.0 for name, s in switches.items())
    for name, ppl in record["metrics"]["ppl"].items():
        # the slots are the run's; only the fp16 rounding of BQ's group scales differs (as for BQ alone)
        assert abs(again["metrics"]["ppl"][name] / ppl - 1) <= 1e-3, (name, again["metrics"]["ppl"][name], ppl)
