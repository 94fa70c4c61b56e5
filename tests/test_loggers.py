"""The W&B mirror of a record: offline, no account, the same metric names as result.json."""

from __future__ import annotations

import pytest

from dynamo.config import LoggerBackend, LoggerConfig, WandbMode
from dynamo.loggers import flatten, publish
from dynamo.report import summary_table

RECORD = {
    "run_id": "2026-01-01_00-00-00_m_fp16", "config_hash": "0123456789abcdef", "config": {"seed": 0},
    "model": {"name": "m", "class": "OlmoeForCausalLM", "dtype": "float32"}, "quant": {"name": "fp16"},
    "metrics": {"ppl": {"code": 12.5, "email": 80.25},
                "lm_eval": {"dynamo_code": {"bits_per_byte": 1.25}, "dynamo_math_mc": {"acc": 0.5}}},
    "protocol": {"ppl": {"code": {"windows": 3, "seqlen": 512}, "email": {"windows": 2, "seqlen": 512}}},
    "timings": {"total_s": 1.0},
}


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
    location = publish(RECORD, cfg, tmp_path)
    assert location and str(tmp_path) in location
    # Offline runs keep everything in one protobuf log (run-*.wandb) until `wandb sync`.
    (log,) = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    data = log.read_bytes()
    assert b"metrics/ppl/code" in data and b"0123456789abcdef" in data and b"2026-01-01_00-00-00_m_fp16" in data


def test_summary_table_shows_roles_and_recorded_numbers():
    table = summary_table(RECORD, known=["code"])
    assert "code     known" in table and "email    novel" in table
    assert "12.500" in table and "80.250" in table and "1.2500" in table
    assert "dynamo_math_mc: acc=0.5000" in table
