"""Run folders cannot escape results_dir and never overwrite a finished record (issue 29, data loss)."""

from __future__ import annotations

import json

import pytest

from conftest import REPO  # noqa: F401  (tests/ on sys.path, as the other tests)

SMOKE = ("experiment=smoke", "logger=none")


def _victim(root):
    """Another run's finished record, which must come through every case unchanged."""
    folder = root / "victim" / "run1"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("mine: true\n")
    (folder / "result.json").write_text(json.dumps({"config_hash": "0" * 16, "metrics": {"ppl": {"code": 1.5}}}))
    return folder


def _unchanged(folder):
    assert json.loads((folder / "result.json").read_text())["metrics"]["ppl"]["code"] == 1.5
    assert (folder / ".hydra" / "config.yaml").read_text() == "mine: true\n", "Hydra wrote into the victim's folder"
    assert sorted(p.name for p in folder.iterdir()) == [".hydra", "result.json"]


def _tiny(model_dir):
    return ("model=local", f"model.path={model_dir}", "quant=rtn_4bit", "eval=ppl", "eval.datasets=[code]",
            "eval.seqlen=64")


def test_a_sweep_tag_with_dotdot_cannot_overwrite_another_record(cli, tmp_path, tiny_model_dir):
    """The issue's reproduction: a sweep job's folder name climbed out of results_dir and its
    result.json replaced the victim's record (old code: exit 0, victim overwritten)."""
    victim = _victim(tmp_path)
    status, _, err = cli("-m", *SMOKE, *_tiny(tiny_model_dir), f"results_dir={tmp_path / 'r'}",
                         "tag=x/../../../victim/run1")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and "tag='x/../../../victim/run1'" in errors[0], err[-2000:]
    _unchanged(victim)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir()), "no run folder is left"


@pytest.mark.parametrize("override", ["tag=a/b", "tag=..", "quant.name=q/../x", "model.name=..\\m"])
def test_folder_name_parts_with_separators_are_refused(cli, tmp_path, override):
    status, _, err = cli(*SMOKE, "quant=fp16", "eval=ppl", f"results_dir={tmp_path}", override)
    assert status == 2 and "would name a folder outside results_dir" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_a_run_dir_holding_a_record_is_never_written_into(cli, tmp_path, tiny_model_dir):
    """hydra.run.dir set by hand to a finished run's folder: refused before Hydra writes its files there
    (old code: .hydra/ replaced and the record overwritten by another config's result)."""
    victim = _victim(tmp_path)
    status, _, err = cli(*SMOKE, *_tiny(tiny_model_dir), f"results_dir={tmp_path / 'r'}", f"hydra.run.dir={victim}")
    assert status == 2 and "already holds a finished run's result.json" in err, err[-2000:]
    _unchanged(victim)


def test_the_record_write_itself_never_replaces_a_record(tmp_path):
    from dynamo.records import RecordExists, write_json_atomic

    path = tmp_path / "result.json"
    write_json_atomic(path, {"a": 1}, replace=False)
    with pytest.raises(RecordExists):
        write_json_atomic(path, {"a": 2}, replace=False)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"], "the temporary file is removed"


def test_a_job_folder_outside_its_sweep_is_refused(tmp_path):
    from dynamo.errors import UserError
    from dynamo.rundir import check_contained

    check_contained(tmp_path / "sweep" / "0_m_q", tmp_path / "sweep", "the job folder")
    with pytest.raises(UserError, match="outside"):
        check_contained(tmp_path / "sweep" / "0_m_q" / ".." / ".." / "victim", tmp_path / "sweep", "the job folder")
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "link").symlink_to(tmp_path)
    with pytest.raises(UserError, match="outside"):  # a symlink is followed too
        check_contained(tmp_path / "sweep" / "link" / "x", tmp_path / "sweep", "the job folder")


@pytest.mark.slow  # two sweeps
def test_a_sweep_job_whose_folder_holds_a_record_is_refused_and_counted(cli, tmp_path, tiny_model_dir):
    """hydra.sweep.dir reused by hand: job 0's folder holds the first sweep's record. The second sweep
    (another config) must not overwrite it; the job is listed as failed and the sweep exits 1."""
    argv = ("-m", *SMOKE, *_tiny(tiny_model_dir), f"results_dir={tmp_path / 'r'}", f"hydra.sweep.dir={tmp_path / 's'}")
    status, _, err = cli(*argv)
    assert status == 0, err[-2000:]
    (record,) = (tmp_path / "s").rglob("result.json")
    before = record.read_bytes()
    status, _, err = cli(*argv, "eval.max_windows=2")
    assert status == 1 and "already holds a finished run's result.json" in err and "sweep: 1 job(s) failed" in err
    assert record.read_bytes() == before and not (record.parent / "failed.json").exists()
