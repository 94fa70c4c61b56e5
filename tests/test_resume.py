"""Resumable runs: a configuration that already has a record under results_dir is not computed again."""

from __future__ import annotations

import json
import logging
import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from conftest import REPO
from dynamo.config import CONF_DIR, register_hydra, to_container
from dynamo.records import config_hash
from dynamo.resume import discard_run_dir, find_record, reusable_record
from test_run import records, run_py

register_hydra()
SMOKE = ("experiment=smoke", "eval=ppl", "eval.datasets=[code]")


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _record(path, digest, **fields):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config_hash": digest, **fields}))
    return path


def test_no_results_dir_means_nothing_to_reuse(tmp_path):
    assert find_record(tmp_path / "missing", "0" * 16) is None
    assert find_record(tmp_path, "0" * 16) is None


def test_finds_a_matching_record_at_any_depth_and_ignores_others(tmp_path):
    _record(tmp_path / "2026-01-01_a" / "result.json", "a" * 16)
    wanted = _record(tmp_path / "sweep_x" / "3_tiny-olmoe_rtn_4bit" / "result.json", "b" * 16)
    (tmp_path / "sweep_x" / "3_tiny-olmoe_rtn_4bit" / ".result.json.abc.tmp").write_text("{")  # an unfinished write
    assert find_record(tmp_path, "b" * 16) == wanted
    assert find_record(tmp_path, "c" * 16) is None


def test_unreadable_files_are_skipped_with_a_warning(tmp_path, caplog):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "result.json").write_text("{not json")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "result.json").write_text("[1, 2]")
    good = _record(tmp_path / "good" / "result.json", "d" * 16)
    with caplog.at_level(logging.WARNING, logger="dynamo.resume"):
        assert find_record(tmp_path, "d" * 16) == good
    assert "skipping unreadable record" in caplog.text and "broken" in caplog.text


def test_the_newest_of_several_matching_records_is_reused(tmp_path):
    newer = _record(tmp_path / "a" / "result.json", "e" * 16)
    older = _record(tmp_path / "b" / "result.json", "e" * 16)
    os.utime(older, (1e9, 1e9))  # 2001
    assert find_record(tmp_path, "e" * 16) == newer


def test_a_run_reuses_the_record_of_its_config_unless_forced(tmp_path):
    cfg = _compose(*SMOKE, f"results_dir={tmp_path}")
    assert cfg.force is False
    assert reusable_record(cfg) is None
    from dynamo.fingerprint import fingerprint_inputs
    from dynamo.records import inputs_hash

    stale = _record(tmp_path / "old" / "result.json", config_hash(to_container(cfg)))
    assert reusable_record(cfg) is None, "a record without the inputs' fingerprint is not known to match them"
    stale.unlink()
    record = _record(tmp_path / "run" / "result.json", config_hash(to_container(cfg)),
                     inputs_hash=inputs_hash(fingerprint_inputs(cfg)))
    assert reusable_record(cfg) == record
    assert reusable_record(_compose(*SMOKE, f"results_dir={tmp_path}", "tag=other")) == record  # tag: not hashed
    assert reusable_record(_compose(*SMOKE, f"results_dir={tmp_path}", "seed=1")) is None
    assert reusable_record(_compose(*SMOKE, f"results_dir={tmp_path}", "force=true")) is None


def test_an_incomplete_config_is_left_to_the_pipeline_to_refuse(tmp_path):
    cfg = _compose("model=local", f"results_dir={tmp_path}")
    _record(tmp_path / "run" / "result.json", config_hash(to_container(cfg)))
    assert reusable_record(cfg) is None


def test_force_is_not_part_of_the_hash_and_old_hashes_stay():
    config = to_container(_compose(*SMOKE))
    forced = to_container(_compose(*SMOKE, "force=true"))
    before = {k: v for k, v in config.items() if k != "force"}  # a config from before `force` existed
    assert config_hash(config) == config_hash(forced) == config_hash(before)


def test_existing_records_keep_their_hash():
    existing = sorted((REPO / "results" / "runs").rglob("result.json"))
    if not existing:
        pytest.skip("no records under results/runs")
    for path in existing:
        record = json.loads(path.read_text())
        assert config_hash(record["config"]) == record["config_hash"], path


def test_misspelt_force_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="forse"):
        _compose("forse=true")


def test_the_folder_hydra_made_for_a_reused_run_is_removed(tmp_path):
    reused = _record(tmp_path / "old" / "result.json", "f" * 16)
    run_dir = tmp_path / "new"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("{}")
    (run_dir / "run.log").write_text("")
    assert discard_run_dir(run_dir, reused) and not run_dir.exists()


def test_a_folder_holding_anything_else_is_kept(tmp_path):
    reused = _record(tmp_path / "same" / "result.json", "f" * 16)
    assert not discard_run_dir(reused.parent, reused)  # a run dir set by hand to the record's own folder
    other = tmp_path / "other"
    (other / ".hydra").mkdir(parents=True)
    (other / "plan.json").write_text("{}")
    assert not discard_run_dir(other, reused)
    assert reused.is_file() and (other / "plan.json").is_file()


@pytest.mark.slow
def test_a_relaunched_sweep_recomputes_only_the_missing_record(tmp_path):
    sweep = (*SMOKE, "quant=fp16,rtn_4bit", "-m")  # -m last: run_py puts its own overrides first
    first = run_py(*sweep, results_dir=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    fp16, rtn = records(tmp_path)
    assert fp16.parent.name.startswith("0_testbed-qwen-moe_fp16")
    assert rtn.parent.name.startswith("1_testbed-qwen-moe_rtn_4bit")
    kept = (fp16.read_bytes(), fp16.stat().st_mtime_ns)
    lost = json.loads(rtn.read_text())
    rtn.unlink()  # what a job killed before its record was written leaves: a folder without result.json

    second = run_py(*sweep, results_dir=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"reusing {fp16} " in second.stdout
    (recomputed,) = set(records(tmp_path)) - {fp16}
    new_sweep = recomputed.parent.parent
    assert new_sweep != fp16.parent.parent
    assert sorted(p.name for p in new_sweep.iterdir() if p.is_dir()) == [recomputed.parent.name], \
        "the reused job left a folder in the new sweep"
    assert (fp16.read_bytes(), fp16.stat().st_mtime_ns) == kept
    again = json.loads(recomputed.read_text())
    assert again["config_hash"] == lost["config_hash"]
    assert again["metrics"] == lost["metrics"]  # same config and seed: the same numbers, exactly

    third = run_py(*sweep, results_dir=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stdout.count("reusing ") == 2 and "record:" not in third.stdout
    assert sorted(records(tmp_path)) == sorted([fp16, recomputed])


@pytest.mark.slow
def test_force_recomputes_and_the_same_config_and_seed_give_identical_metrics(tmp_path):
    # different tags only to get different run folders: tag is not part of the hash
    runs = [run_py(*SMOKE, "quant=fp16", "force=true", f"tag={tag}", results_dir=tmp_path) for tag in ("a", "b")]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "reusing" not in proc.stdout
    first, second = (json.loads(p.read_text()) for p in records(tmp_path))
    assert first["config_hash"] == second["config_hash"] and first["run_id"] != second["run_id"]
    assert first["metrics"] == second["metrics"]
    nll = [json.loads((p.parent / "window_nll.json").read_text()) for p in records(tmp_path)]
    assert nll[0] == nll[1]


def test_new_bytes_at_the_same_data_path_do_not_match_the_old_record(tmp_path):
    """The check behind the three runs below, without the runs: the record written for a data file's old
    bytes is reused for them and not for new bytes at the same path."""
    from dynamo.fingerprint import fingerprint_inputs
    from dynamo.records import inputs_hash

    data = tmp_path / "data.jsonl"
    data.write_text((REPO / "assets/data/code/test.jsonl").read_text())
    cfg = _compose("experiment=smoke", "eval=ppl", f"results_dir={tmp_path / 'runs'}", "dataset=local",
                   f"dataset.path={data}")
    record = _record(tmp_path / "runs" / "a" / "result.json", config_hash(to_container(cfg)),
                     inputs_hash=inputs_hash(fingerprint_inputs(cfg)))
    assert reusable_record(cfg) == record
    data.write_text((REPO / "assets/data/math/test.jsonl").read_text())
    assert reusable_record(cfg) is None


@pytest.mark.slow  # three runs
def test_a_changed_data_file_at_the_same_path_is_not_reused(cli, tmp_path, tiny_model_dir):
    """The issue's case: resume keyed records by config only, so new text at the same path got the old
    record's PPL (old code: the second run printed 'reusing')."""
    data = tmp_path / "data.jsonl"
    data.write_text((REPO / "assets/data/code/test.jsonl").read_text())
    argv = ("experiment=smoke", "logger=none", f"results_dir={tmp_path / 'runs'}", "model=local",
            f"model.path={tiny_model_dir}", "quant=fp16", "eval=ppl", "eval.seqlen=64", "dataset=local",
            f"dataset.path={data}")
    status, out, err = cli(*argv)
    assert status == 0, err[-2000:]
    def reused(out):
        return any(line.startswith("reusing ") for line in out.splitlines())

    status, out, _ = cli(*argv)
    assert status == 0 and reused(out), "the same bytes reuse the record"
    data.write_text((REPO / "assets/data/math/test.jsonl").read_text())
    status, out, err = cli(*argv)
    assert status == 0 and not reused(out), err[-2000:]
    records = sorted(tmp_path.rglob("result.json"), key=lambda p: p.stat().st_mtime_ns)
    first, second = (json.loads(p.read_text()) for p in records)
    assert first["config_hash"] == second["config_hash"] and first["inputs_hash"] != second["inputs_hash"]
    assert first["metrics"]["ppl"] != second["metrics"]["ppl"]


def test_fingerprints_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
    """A large checkpoint is hashed once; a changed file (new size or mtime) is hashed again."""
    from dynamo import fingerprint

    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 100)
    reads = []
    real_open = open
    monkeypatch.setattr(fingerprint, "open", lambda p, mode="r": reads.append(p) or real_open(p, mode),
                        raising=False)
    cache = {}
    first = fingerprint.file_digest(path, cache)
    assert fingerprint.file_digest(path, cache) == first and len(reads) == 1
    path.write_bytes(b"b" * 100)  # same size, new mtime
    os.utime(path, ns=(1, 1))
    assert fingerprint.file_digest(path, cache) != first and len(reads) == 2
