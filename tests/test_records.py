"""Run records: atomic writes and a config hash that means "same computation"."""

from __future__ import annotations

import json

import pytest

from dynamo.records import config_hash, write_json_atomic


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "result.json"
    write_json_atomic(path, {"a": 1})

    class Boom:
        def __str__(self):
            raise RuntimeError("serialisation failed half-way")

    with pytest.raises(RuntimeError):
        write_json_atomic(path, {"a": 2, "b": Boom()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"], "temporary file left behind"


def test_config_hash_ignores_where_a_run_is_logged_not_what_it_computes():
    base = {"model": {"name": "m"}, "eval": {"seqlen": 512}, "logger": {"name": "none"}, "results_dir": "a"}
    moved = {**base, "logger": {"name": "wandb"}, "results_dir": "b"}
    changed = {**base, "eval": {"seqlen": 256}}
    assert config_hash(base) == config_hash(moved)
    assert config_hash(base) != config_hash(changed)
    assert config_hash(dict(reversed(list(base.items())))) == config_hash(base)


def test_where_the_analysis_cache_lives_does_not_change_the_hash():
    base = {"model": {"name": "m"}, "analysis": {"channel_metric": "act_l2", "cache_dir": "/a", "figures": True}}
    moved = {"model": {"name": "m"}, "analysis": {"channel_metric": "act_l2", "cache_dir": "/b", "figures": False}}
    other = {"model": {"name": "m"}, "analysis": {"channel_metric": "wanda", "cache_dir": "/a", "figures": True}}
    assert config_hash(base) == config_hash(moved) != config_hash(other)


def _result_of(record: dict, run_dir):
    """The RunResult a committed record was written from, rebuilt from it and the files beside it."""
    from dynamo.eval.fidelity import WindowFidelity
    from dynamo.eval.harness import LmEvalResult
    from dynamo.result import Evaluation, LmEval, PerplexityPass, RunResult, Switching

    metrics = record["metrics"]

    def load(name):
        path = run_dir / name
        return json.loads(path.read_text()) if path.is_file() else {}

    def pass_of(ppl_key, nll_file, kl_file=None, suffix="", protocol=None):
        if ppl_key not in metrics:
            return None
        kl = load(kl_file) if kl_file is not None and f"kl{suffix}" in metrics else {}
        fidelity = {name: WindowFidelity(kl=kl[name], top1=[metrics[f"top1_agree{suffix}"][name]]) for name in kl}
        return PerplexityPass(ppl=metrics[ppl_key], protocol=protocol or {}, window_nll=load(nll_file),
                              fidelity=fidelity)

    switching = dict(record.get("switching") or {})
    evaluation = Evaluation(run=pass_of("ppl", "window_nll.json", "window_kl.json",
                                        protocol=record["protocol"]["ppl"]),
                            bq=pass_of("ppl_bq", "window_nll_bq.json", "window_kl_bq.json", "_bq"),
                            switching=Switching(switching.pop("switches"), switching) if switching else None,
                            stream=metrics.get("stream"))
    lm_eval = None
    if "lm_eval" in metrics:
        lm_eval = LmEval(LmEvalResult(metrics["lm_eval"], load("mc_correct.json")), record["protocol"]["lm_eval"], 0.0)
    return RunResult(run_id=record["run_id"], config=record["config"], overrides=record["overrides"],
                     created_at=record["created_at"], device=record["device"], git=record["git"],
                     versions=record["versions"], model=record["model"], evaluation=evaluation,
                     timings=record["timings"], fp16=pass_of("ppl_fp16", "window_nll_fp16.json"), lm_eval=lm_eval,
                     calibration=record.get("calibration"), analysis=record.get("analysis"),
                     quantization=record.get("quantization"), export=record.get("export"),
                     inputs=record.get("inputs"))


def test_a_run_result_serialises_to_the_committed_records_byte_for_byte():
    """records.record_of / sample_files are the one serialisation of a RunResult: rebuilt from each
    committed record made since per-window files exist, they give back its result.json and its files."""
    from conftest import REPO
    from dynamo.records import record_of, sample_files

    checked = 0
    for path in sorted((REPO / "results" / "runs").rglob("result.json")):
        if not (path.parent / "window_nll.json").is_file():
            continue  # older than the paired samples: written by a different pipeline
        record = json.loads(path.read_text())
        result = _result_of(record, path.parent)
        assert json.dumps(record_of(result), indent=2) == json.dumps(record, indent=2), path.parent.name
        for name, payload in sample_files(result).items():
            assert payload == json.loads((path.parent / name).read_text()), (path.parent.name, name)
        checked += 1
    assert checked >= 2
