"""A packed checkpoint never loads silently wrong: transformers without the harness refuses it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

from tiny_families import build

# run by a Python that cannot import this project: -I (no PYTHONPATH, no cwd on sys.path), and the
# editable install (`pip install -e .`, as the README and CI do) unhooked, so `import dynamo` fails
OUTSIDE = """
import importlib.util, json, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "").lower()]
sys.path_hooks = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
sys.path = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("dynamo") is None, "the harness is still importable"
from transformers import AutoModelForCausalLM
out = {}
for name, kwargs in (("plain", {}), ("trusted", {"trust_remote_code": True})):
    try:
        AutoModelForCausalLM.from_pretrained(sys.argv[1], **kwargs)
        out[name] = "loaded"
    except Exception as err:
        out[name] = f"{type(err).__name__}: {err}"
print("RESULT " + json.dumps(out))
"""
# run with the harness on PYTHONPATH, from elsewhere: remote code imports it and loads the packed experts
TRUSTED = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
"""


def packed_checkpoint(tmp_path: Path):
    from dynamo.export.packed import save_packed
    from dynamo.quant import QSpec, QuantPlan, apply_plan
    from dynamo.packed.model import attach_packed, pack_experts

    model = build("olmoe")
    report = apply_plan(model, QuantPlan(method="rtn", default=QSpec(3, group_size=8)), keep_codes=True)
    attach_packed(model, pack_experts(model, report.codes))
    ids = torch.randint(2, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    save_packed(model, None, tmp_path / "packed")
    return tmp_path / "packed", ids, expected


def python(args: list[str], cwd: Path, pythonpath: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(cwd / "hf_home"))
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def test_the_harness_loads_a_guarded_checkpoint_without_remote_code(tmp_path):
    from dynamo.config import ModelConfig
    from dynamo.models import load_model
    from dynamo.packed.format import MODEL_TYPE, load_packed

    path, ids, expected = packed_checkpoint(tmp_path)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE and config["auto_map"]["AutoConfig"].startswith("dynamo_packed.")
    assert config["dynamo_packed"]["base_model_type"] == "olmoe" and (path / "dynamo_packed.py").is_file()
    assert "trust_remote_code" in (path / "README.md").read_text()
    with torch.no_grad():
        assert torch.equal(load_packed(path).eval()(ids).logits, expected)
        loaded = load_model(ModelConfig(name="packed", path=str(path), device="cpu", dtype="float32"))
        assert torch.equal(loaded.model(ids).logits, expected)  # model=local, trust_remote_code=false


def test_the_import_paths_that_checkpoints_exported_before_the_format_moved_still_use():
    """Their shipped dynamo_packed.py calls dynamo.export.guard.base_config and
    dynamo.packed.hf_quantizer.load_packed: both are the format's own functions."""
    from dynamo.export import guard
    from dynamo.packed import format as packed_format, hf_quantizer

    assert guard.base_config is packed_format.base_config and guard.KEY == packed_format.KEY
    assert hf_quantizer.load_packed is packed_format.load_packed


@pytest.mark.slow
def test_transformers_without_the_harness_refuses_a_packed_checkpoint(tmp_path):
    path, ids, expected = packed_checkpoint(tmp_path)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = python(["-I", "-c", OUTSIDE, str(path)], cwd, pythonpath=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    # no trust_remote_code: transformers' own refusal (the model type is unknown, nothing local to fall back on)
    assert result["plain"].startswith("ValueError") and "trust_remote_code=True" in result["plain"], result
    # trusted but the harness is not importable: the shipped module says how to load it
    assert result["trusted"].startswith("ImportError") and "packed DynaMo checkpoint" in result["trusted"], result
    assert "load_packed" in result["trusted"] and "quant.export=dequantized" in result["trusted"]

    # trusted, with the harness on the path: the packed experts load, the logits are the saved model's
    torch.save(ids, tmp_path / "ids.pt")
    proc = python(["-c", TRUSTED, str(path), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")], cwd,
                  pythonpath=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The child runs with OMP_NUM_THREADS=1, the parent with its default threads: the GEMMs split their
    # sums differently, and float32 reassociation moves a logit by a few ulps per layer (bit-exact only
    # when both sides happen to use one thread). A wrong tensor or kernel moves logits by >1e-2, so
    # 1e-5 of the logits' scale separates the two cases on any x86-64 CPU and thread count.
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5,
                               atol=1e-5 * float(expected.abs().max()))
