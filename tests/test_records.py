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
