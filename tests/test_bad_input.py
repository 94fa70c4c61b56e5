"""Bad input, end to end through run.py's command line (in process): every bad input is one `error:`
line and exit status 2, leaves no run folder, and loses no other run's record."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO

SMOKE = ("experiment=smoke", "logger=none")
FAST = ("quant=fp16", "eval=ppl", "eval.datasets=[code]")
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def results(tmp_path):
    """A results_dir that already holds another run's finished record, which must survive."""
    folder = tmp_path / "runs" / "2026-01-01_00-00-00-000-beef_tiny-olmoe_fp16"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"config_hash": "0" * 16, "metrics": {"ppl": {"code": 1.5}}}))
    return tmp_path / "runs"


def assert_rejected(status: int, err: str, results, message: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2, err[-3000:]
    assert len(errors) == 1 and message in errors[0], err[-3000:]
    assert "Traceback" not in err
    kept = [p.name for p in results.iterdir()] if results.exists() else []
    assert kept == ["2026-01-01_00-00-00-000-beef_tiny-olmoe_fp16"], f"a rejected run left {kept}"
    assert json.loads((results / kept[0] / "result.json").read_text())["metrics"]["ppl"]["code"] == 1.5
    return errors[0]


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.fixture
def files(tmp_path, tiny_model_dir):
    """Bad files of every kind the issue lists, by name."""
    made = {
        "latin1": _write(tmp_path / "latin1.jsonl", '{"text": "café crème brûlée, naïve façade"}\n'.encode("latin-1") * 4),
        "int_text": _write(tmp_path / "int.jsonl", b'{"text": "fine"}\n{"text": 5}\n'),
        "null_text": _write(tmp_path / "null.jsonl", b'{"text": "fine"}\n{"text": null}\n'),
        "empty": _write(tmp_path / "empty.jsonl", b""),
        "good": _write(tmp_path / "good.jsonl", (REPO / "assets/data/code/test.jsonl").read_bytes()),
        "one_token": _write(tmp_path / "one.txt", b"hello"),
        "binary": shutil.which("ls") or "/bin/ls",
        "folder": tmp_path,
    }
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    made["truncated"] = truncated
    return made


@pytest.fixture
def nan_model(tmp_path, tiny_model_dir):
    """The tiny checkpoint with one NaN in layer 1, expert 2's gate/up weights."""
    out = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, out)
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.1.mlp.experts.2.gate_proj.weight"][0, 0] = float("nan")  # fused in memory: gate_up_proj
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


CASES = {
    # silently changed or ignored settings
    "target_bits_above_widths": (["quant.allocation.target_bits=9.0"], "outside the widths offered"),
    "appended_unknown_key": (["+quant.bitz=3"], "unknown key 'quant.bitz'; quant has: act_order"),
    "binary_dataset": (["dataset=local", "dataset.path={binary}", *FAST[:2]], "a binary file, not text"),
    # malformed data
    "non_utf8": (["dataset=local", "dataset.path={latin1}", *FAST[:2]], "not UTF-8 text (it looks like"),
    "int_text_field": (["dataset=local", "dataset.path={int_text}", *FAST[:2]], "int.jsonl:2: expected a JSON object"),
    "null_text_field": (["dataset=local", "dataset.path={null_text}", *FAST[:2]], "null.jsonl:2: expected"),
    "truncated_checkpoint": (["model=local", "model.path={truncated}", *FAST[:2]], "model.safetensors is truncated"),
    # bad values
    "seqlen_zero": (["eval.seqlen=0"], "eval.seqlen=0 must be >= 2"),
    "seqlen_negative": (["eval.seqlen=-5"], "eval.seqlen=-5 must be >= 2"),
    "max_windows_zero": (["eval.max_windows=0"], "eval.max_windows=0 must be >= 1"),
    "dynamic_frac_zero": (["analysis.dynamic_channel_frac=0"], "must be in (0, 1]"),
    "dynamic_frac_above_one": (["analysis.dynamic_channel_frac=1.5"], "must be in (0, 1]"),
    # Hydra schema errors
    "unknown_method": (["quant.method=foo"], "quant.method: Invalid value 'foo', expected one of [none, rtn, gptq, bnb]"),
    "misspelt_key": (["quant.allocation.methd=fcm"], "unknown key 'quant.allocation.methd'; quant.allocation has:"),
    "unknown_top_key": (["bogus=1"], "unknown key 'bogus'; the config has:"),
    "wrong_type": (["eval.seqlen=abc"], "eval.seqlen: Value 'abc' of type 'str' could not be converted to Integer"),
    "sweep_without_m": (["quant=fp16,rtn_4bit"], "a comma-separated value is a sweep; add -m"),
    # files the run cannot use, and the cosmetic items
    "results_dir_is_a_file": (["results_dir={good}/runs"], "is a file, not a folder"),
    "empty_calib_file": (["dataset=local", "dataset.path={good}", "dataset.calib_path={empty}", "calib.enabled=true",
                          *FAST[:2]], "empty.jsonl: no text in the calib split"),
    "directory_as_data": (["dataset=local", "dataset.path={folder}", *FAST[:2]], "is a directory; give a data file"),
    "one_token_calib_file": (["dataset=local", "dataset.path={good}", "dataset.calib_path={one_token}",
                              "calib.enabled=true", *FAST[:2]], "less than one window of calib.seqlen=512"),
    # names and paths that do not exist, data a run cannot use, exports a run cannot write (once each a
    # `python run.py` subprocess in tests/test_run.py; its real-process check keeps one of them)
    "unknown_model": (["model=nope"], "unknown model 'nope'; choose one of:"),
    "unknown_dataset": (["dataset=wikitxt2"], "unknown dataset 'wikitxt2'"),
    "no_checkpoint": (["model=local", "model.path=/no/such/checkpoint"], "no checkpoint there"),
    "local_model_without_path": (["model=local"], "missing required value(s): model.path"),
    "local_dataset_without_path": (["dataset=local"], "dataset 'local' has no sources; give a file with dataset.path="),
    "empty_data_file": (["dataset=local", "dataset.path={empty}"], "no text"),
    "seqlen_beyond_the_model": (["eval.seqlen=4096", "eval.datasets=[chat]"], "longer than testbed-qwen-moe allows"),
    "hub_dataset_offline": (["dataset=wikitext2"], "could not load hub dataset"),
    "eval_dataset_not_in_the_suite": (["eval.datasets=[klingon]"], "not in dataset 'embedded'"),
    "packed_export_of_fp16": (["quant=fp16", "quant.export=packed"], "quant.export=packed needs integer codes"),
    "replaced_export_key": (["quant.export_packed=true"], "quant.export_packed was replaced by quant.export=packed"),
    "gptqmodel_export_of_dqs": (["quant.export=gptqmodel"], "use quant.export=dequantized"),
    "export_dataset_unknown": (["quant.export=dequantized", "quant.export_dataset=klingon"],
                               "quant.export_dataset=klingon is not a dataset"),
    "calib_on_the_test_split": (["calib.enabled=true", "calib.split=test"], "would calibrate on the evaluation data"),
}


# Refused inside a run, each of these costs about 1.3 s (Hydra composes the config four times): the fast
# tier (-m "not slow") keeps one case of each kind and every case refused while the config is composed
# (under 0.5 s each); these run in the full suite only. A new case is fast unless it is listed here.
SLOW_CASES = {"binary_dataset", "int_text_field", "null_text_field", "seqlen_negative", "max_windows_zero",
              "dynamic_frac_zero", "dynamic_frac_above_one", "target_bits_above_widths", "directory_as_data",
              "one_token_calib_file", "no_checkpoint", "local_model_without_path", "local_dataset_without_path",
              "empty_data_file", "seqlen_beyond_the_model", "hub_dataset_offline", "replaced_export_key",
              "gptqmodel_export_of_dqs", "export_dataset_unknown", "calib_on_the_test_split"}


def tiered(cases, slow) -> list:
    """`cases` as parameters, those in `slow` marked slow."""
    return [pytest.param(c, marks=pytest.mark.slow) if c in slow else c for c in sorted(cases)]


def test_the_slow_cases_exist():
    assert SLOW_CASES <= set(CASES), SLOW_CASES - set(CASES)


@pytest.mark.parametrize("case", tiered(CASES, SLOW_CASES))
def test_bad_input_is_one_line_exit_2_no_folder_no_record_lost(case, cli, results, files):
    overrides, message = CASES[case]
    argv = [*SMOKE, f"results_dir={results}", *[o.format(**files) for o in overrides]]
    status, _, err = cli(*argv)
    line = assert_rejected(status, err, results if "results_dir" not in case else results, message)
    assert "+" not in line.split(":", 1)[1].replace("(0, 1]", ""), "the message must never suggest +key"


@pytest.mark.parametrize("quant", tiered(["fp16", "gptq_4bit", "dynamo_3bit"], {"fp16", "gptq_4bit"}))
def test_nan_in_an_expert_weight_is_refused_naming_layer_expert_and_matrix(cli, results, nan_model, quant):
    status, _, err = cli(*SMOKE, f"results_dir={results}", "model=local", f"model.path={nan_model}", f"quant={quant}",
                         "eval=ppl", "eval.seqlen=64")
    assert_rejected(status, err, results, "NaN or Inf in layer 1, expert 2, gate_up_proj")


@pytest.mark.skipif(ROOT, reason="root may write to a read-only folder")
def test_a_read_only_results_dir_is_one_line(cli, results):
    results.chmod(0o555)
    try:
        status, _, err = cli(*SMOKE, f"results_dir={results}", *FAST)
        assert_rejected(status, err, results, "is not writable")
    finally:
        results.chmod(0o755)


def test_a_read_only_results_dir_is_refused_before_hydra_starts(monkeypatch, tmp_path):
    """The check itself, also where the tests run as root (who may write anywhere)."""
    from dynamo.errors import UserError
    from dynamo.rundir import check_writable

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="is not writable"):
        check_writable(tmp_path / "runs" / "deeper")


@pytest.mark.slow  # two jobs
def test_a_sweep_records_a_failed_job_and_goes_on(cli, results):
    status, out, err = cli("-m", *SMOKE, f"results_dir={results}", *FAST, "eval.max_windows=0,1")
    assert status == 1, err[-3000:]
    (failed,) = results.rglob("failed.json")
    failure = json.loads(failed.read_text())
    assert failure["job"] == 0 and failure["error"] == "error: eval.max_windows=0 must be >= 1"
    assert "eval.max_windows=0" in failure["overrides"]
    records = [p for p in results.rglob("result.json") if "beef" not in str(p)]
    assert len(records) == 1 and records[0].parent.parent == failed.parent.parent, "job 1 must still run"
    assert "sweep: 1 job(s) failed" in err and "job 0 (" in err and "eval.max_windows=0 must be >= 1" in err
    assert "Traceback" not in err


def test_a_run_on_a_model_path_is_named_after_the_checkpoint(cli, tmp_path, tiny_model_dir):
    status, out, err = cli(*SMOKE, f"results_dir={tmp_path}", "model=local", f"model.path={tiny_model_dir}",
                           *FAST, "eval.seqlen=64")
    assert status == 0, err[-3000:]
    (record,) = tmp_path.rglob("result.json")
    assert f"_{tiny_model_dir.name}_fp16_smoke" in record.parent.name
    assert record.parent.name[:23].count("-") == 5, "milliseconds and a random part follow the second"


def test_nonfinite_record_is_refused_and_never_written(tmp_path):
    from dynamo.errors import UserError
    from dynamo.finite import check_finite
    from dynamo.records import write_json_atomic

    record = {"metrics": {"ppl": {"code": 3.0}, "kl": {"code": [0.1, float("inf")]}, "future": {"x": float("nan")}}}
    with pytest.raises(UserError, match=r"metrics\.kl\.code\[1\], metrics\.future\.x"):
        check_finite(record, "the run's record", "hint")
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "result.json", record)
    assert not list(tmp_path.iterdir()), "a refused write leaves no file, not even a temporary one"


def test_resume_never_reuses_a_record_with_nan(tmp_path):
    from dynamo.resume import find_record

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "result.json").write_text('{"config_hash": "abc", "metrics": {"ppl": {"code": NaN}}}')
    assert find_record(tmp_path, "abc") is None


def test_weights_check_names_a_fused_expert():
    from dynamo.errors import UserError
    from dynamo.finite import check_weights_finite

    model = torch.nn.Module()
    model.register_parameter("layers_3", None)
    experts = torch.nn.Module()
    experts.down_proj = torch.nn.Parameter(torch.zeros(4, 2, 2))
    with torch.no_grad():
        experts.down_proj[3, 1, 0] = float("inf")
    layer = torch.nn.Module()
    layer.experts = experts
    model.layers = torch.nn.ModuleList([torch.nn.Identity(), layer])
    with pytest.raises(UserError, match=r"layer 1, expert 3, down_proj \(layers\.1\.experts\.down_proj\)"):
        check_weights_finite(model, "model x", "hint")
