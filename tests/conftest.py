"""Shared fixtures. Tests never touch the network, W&B or the user's caches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "assets" / "tokenizer"


@pytest.fixture(autouse=True, scope="session")
def _offline_environment(tmp_path_factory):
    hf_home = tmp_path_factory.mktemp("hf_home")
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE",
                                            "DYNAMO_CACHE")}
    os.environ.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
                      DYNAMO_CACHE=str(tmp_path_factory.mktemp("dynamo_cache")))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the marker must be on the item by then
def pytest_collection_modifyitems(items):
    """A test that reads the session's smoke record pays for one whole run (about a minute) when it is the
    first to ask for it: it is slow whether or not its author remembered the marker."""
    for item in items:
        if "smoke_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@dataclass(frozen=True)
class SmokeRun:
    """One `python run.py experiment=smoke` (the default model and method, a seconds-long protocol)."""

    record_path: Path
    record: dict
    stdout: str
    stderr: str

    @property
    def folder(self) -> Path:
        return self.record_path.parent


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
    """The smoke run, once per session, for every test that only reads its record, files or printout.
    A real process, as a user starts it; its own analysis cache, so the record holds fresh (cache-miss)
    capture times. Tests must not write into its folder."""
    root = tmp_path_factory.mktemp("smoke_run")
    cmd = [sys.executable, "run.py", f"results_dir={root / 'runs'}", "logger=none", "experiment=smoke",
           f"analysis.cache_dir={root / 'analysis'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = sorted((root / "runs").rglob("result.json"))
    return SmokeRun(path, json.loads(path.read_text()), proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def tiny_olmoe_config(vocab_size: int, **overrides):
    from transformers import OlmoeConfig

    fields = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=128, pad_token_id=1, eos_token_id=0, bos_token_id=0)
    fields.update(overrides)
    return OlmoeConfig(**fields)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A random tiny OLMoE saved like a hub checkpoint (seconds to build, no training)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-random-olmoe")
    AutoModelForCausalLM.from_config(tiny_olmoe_config(len(tokenizer))).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _load_run_py():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dynamo_run_py", REPO / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def run_py_module():
    return _load_run_py()


@pytest.fixture
def cli(run_py_module, capsys, monkeypatch):
    """`python run.py ARGS` in this process (seconds cheaper than a subprocess): (exit status, stdout,
    stderr). Hydra's logging setup and run.py's claimed-folder variable are undone after each call."""
    import logging

    from hydra.core.global_hydra import GlobalHydra

    from dynamo.rundir import OWNED_ENV

    def call(*argv: str) -> tuple[int, str, str]:
        root = logging.getLogger()
        saved = (root.handlers[:], root.level)
        monkeypatch.delenv(OWNED_ENV, raising=False)
        GlobalHydra.instance().clear()
        capsys.readouterr()
        try:
            status = run_py_module.cli(list(argv))
        finally:
            for handler in root.handlers[:]:
                if handler not in saved[0]:
                    root.removeHandler(handler)
                    handler.close()
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
            GlobalHydra.instance().clear()
            os.environ.pop(OWNED_ENV, None)
        out = capsys.readouterr()
        return status, out.out, out.err

    return call
