"""The W&B mirror of a record: offline, no account, the same metric names as result.json."""

from __future__ import annotations

import time

import pytest

from dynamo.config import LoggerBackend, LoggerConfig, WandbMode
from dynamo.loggers import artifact_name, flatten, markdown_tables, publish, publish_tables
from dynamo.report import summary_table

RECORD = {
    "run_id": "2026-01-01_00-00-00_m_fp16", "config_hash": "0123456789abcdef", "config": {"seed": 0},
    "model": {"name": "m", "class": "OlmoeForCausalLM", "dtype": "float32"}, "quant": {"name": "fp16"},
    "metrics": {"ppl": {"code": 12.5, "email": 80.25},
                "lm_eval": {"dynamo_code": {"bits_per_byte": 1.25}, "dynamo_math_mc": {"acc": 0.5}}},
    "protocol": {"ppl": {"code": {"windows": 3, "seqlen": 512}, "email": {"windows": 2, "seqlen": 512}}},
    "timings": {"total_s": 1.0},
}


def _offline_log(root, needle: bytes, timeout: float = 30.0) -> bytes:
    """The offline run's protobuf log (run-*.wandb) once it holds `needle`: wandb's service process may
    still be flushing it when run.finish() returns on a loaded machine."""
    deadline = time.monotonic() + timeout
    while True:
        (log,) = list(root.glob("wandb/offline-run-*/run-*.wandb"))
        data = log.read_bytes()
        if needle in data or time.monotonic() > deadline:
            return data
        time.sleep(0.2)


def test_flatten_uses_the_record_paths():
    assert flatten({"ppl": {"code": 1.0}, "x": 2}, "metrics") == {"metrics/ppl/code": 1.0, "metrics/x": 2}


def test_none_backend_writes_nothing(tmp_path):
    assert publish(RECORD, LoggerConfig(name="none", backend=LoggerBackend.none), tmp_path) is None
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = LoggerConfig(name="wandb", backend=LoggerBackend.wandb, mode=WandbMode.offline)
    (tmp_path / "plan.json").write_text('{"bits": {"0": [3, 4]}}')
    (tmp_path / "significance.safetensors").write_bytes(b"not really safetensors")
    (tmp_path / "significance.json").write_text('{"datasets": ["code"]}')  # its metadata travels with it
    (tmp_path / "window_nll.json").write_text('{"code": [2.5, 2.6]}')
    location = publish(RECORD, cfg, tmp_path)
    assert location and str(tmp_path) in location
    # Offline runs keep everything in one protobuf log (run-*.wandb) until `wandb sync`.
    data = _offline_log(tmp_path, b"window_nll.json")
    assert b"metrics/ppl/code" in data and b"0123456789abcdef" in data and b"2026-01-01_00-00-00_m_fp16" in data
    # The run's files travel as one artifact, named after the run.
    assert b"run-2026-01-01_00-00-00_m_fp16" in data and b"dynamo-run" in data
    for name in (b"plan.json", b"significance.safetensors", b"significance.json", b"window_nll.json"):
        assert name in data
    assert b"mc_correct.json" not in data  # absent files are not invented


def test_artifact_names_and_markdown_tables_parse():
    assert artifact_name("run-sweep_2026/3_tiny-olmoe_fp16") == "run-sweep_2026-3_tiny-olmoe_fp16"
    page = "# T\n\n## m1\n\n| a | b |\n|---|---|\n| 1 | x y |\n\n### m1: CI\n\n| a |\n|---|\n| 2 |\n"
    assert markdown_tables(page) == {"m1": (["a", "b"], [["1", "x y"]]), "m1: CI": (["a"], [["2"]])}


@pytest.mark.slow
def test_wandb_offline_tables_are_an_artifact_and_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    md, tex = tmp_path / "baselines.md", tmp_path / "baselines.tex"
    md.write_text("# Baselines\n\n## tiny-olmoe\n\n| quant | code* |\n|---|---|\n| gptq_3bit | 19.94 \u2020 |\n")
    tex.write_text("% Baselines\n")
    cfg = LoggerConfig(name="wandb", backend=LoggerBackend.wandb, mode=WandbMode.offline)
    location = publish_tables([md, tex], cfg, tmp_path / "out")
    assert location and str(tmp_path / "out") in location
    data = _offline_log(tmp_path / "out", b"baselines.tex")
    assert b"baselines.md" in data and b"baselines.tex" in data and b"tables/baselines/tiny-olmoe" in data
    (table,) = list((tmp_path / "out").glob("wandb/offline-run-*/files/media/table/tables/baselines/*.table.json"))
    assert "gptq_3bit" in table.read_text() and "19.94" in table.read_text()


def test_summary_table_shows_roles_and_recorded_numbers():
    table = summary_table(RECORD, known=["code"])
    assert "code     known" in table and "email    novel" in table
    assert "12.500" in table and "80.250" in table and "1.2500" in table
    assert "dynamo_math_mc: acc=0.5000" in table


@pytest.mark.slow  # a whole run before the tracker fails
def test_a_tracker_failure_after_the_record_is_a_warning_and_exit_0(cli, tmp_path, tiny_model_dir, monkeypatch):
    """Issue 29: W&B failing after result.json was written (no network, WANDB_MODE= empty, an unwritable
    home) made a finished run exit 1; now the run succeeds and the record carries the warning."""
    import json

    import dynamo.pipeline

    def broken(record, cfg, run_dir):
        raise RuntimeError("wandb.errors.UsageError: invalid mode ''\nmore lines")

    monkeypatch.setattr(dynamo.pipeline, "publish", broken)
    status, out, err = cli("experiment=smoke", "logger=none", f"results_dir={tmp_path}", "model=local",
                           f"model.path={tiny_model_dir}", "quant=fp16", "eval=ppl", "eval.seqlen=64",
                           "eval.datasets=[code]")
    assert status == 0, err[-2000:]
    (path,) = tmp_path.rglob("result.json")
    record = json.loads(path.read_text())
    assert record["warnings"] == ["logging to none failed after the record was written: RuntimeError: "
                                  "wandb.errors.UsageError: invalid mode ''"]
    assert "failed after the record was written" in out + err
