"""Never load silently wrong (issue 29): a checkpoint whose tensors are missing, unexpected or of the
wrong shape, plain or packed, and a packed layout that disagrees with its tensors, are refused in one
line; token ids beyond the model's vocabulary are refused before evaluation."""

from __future__ import annotations

import json
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO

sys.path.insert(0, str(REPO / "tests" / "export"))
from test_guard import packed_checkpoint  # noqa: E402


def _load(path):
    from dynamo.config import ModelConfig
    from dynamo.models import load_model

    return load_model(ModelConfig(name="m", path=str(path), device="cpu", dtype="float32"))


def _edit_tensors(folder: Path, edit) -> Path:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return packed_checkpoint(tmp_path_factory.mktemp("packed"))


def _copy(src: Path, tmp_path: Path) -> Path:
    out = tmp_path / src.name
    shutil.copytree(src, out)
    return out


def _first(tensors, part):
    return next(k for k in sorted(tensors) if part in k)


PLAIN = {
    "missing_router": (lambda t: t.pop(_first(t, "mlp.gate.weight")), "1 missing tensor(s) (model.layers.0.mlp.gate"),
    "unexpected": (lambda t: t.update({"model.extra.weight": torch.zeros(2)}), "1 unexpected tensor(s) (model.extra"),
    "wrong_shape": (lambda t: t.update({_first(t, "q_proj"): torch.zeros(3, 3)}), "of the wrong shape"),
}


@pytest.mark.parametrize("case", sorted(PLAIN))
def test_a_plain_checkpoint_that_does_not_match_its_config_is_refused(case, tmp_path, tiny_model_dir):
    from dynamo.errors import UserError

    edit, message = PLAIN[case]
    folder = _edit_tensors(_copy(tiny_model_dir, tmp_path), edit)
    with pytest.raises(UserError, match="the weights do not match the model's config") as err:
        _load(folder)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_packed_checkpoint_missing_one_qweight_is_refused(tmp_path, packed):
    """The issue's case: one qweight deleted reloaded with random codes and was evaluated."""
    from dynamo.errors import UserError

    folder = _edit_tensors(_copy(packed[0], tmp_path), lambda t: t.pop(_first(t, "down_0.qweight")))
    with pytest.raises(UserError, match=r"1 missing tensor\(s\) \(model.layers.0.mlp.experts.packed.stacks.down_0"):
        _load(folder)


def test_a_packed_layout_edited_to_other_bits_is_refused(tmp_path, packed):
    from dynamo.errors import UserError

    folder = _copy(packed[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["layers"]["0"]["widths"]["down"][0] = [4, 8]  # tensors hold 3-bit codes
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="the weights do not match the model's config"):
        _load(folder)


def test_an_intact_packed_checkpoint_still_loads_and_is_readable(packed):
    path, ids, expected = packed
    with torch.no_grad():
        assert torch.equal(_load(path).model(ids).logits, expected)  # the same code path twice: bit for bit
    assert stat.S_IMODE((path / "model.safetensors").stat().st_mode) == 0o644, "exports are readable like records"


def test_token_ids_beyond_the_vocabulary_are_refused_before_evaluation(cli, tmp_path, tokenizer, monkeypatch):
    """A model saved with another model's tokenizer: ids past its embedding used to fail deep in the
    forward pass (a traceback) or, on some devices, read the wrong rows."""
    from transformers import AutoModelForCausalLM

    import dynamo.pipeline
    from conftest import tiny_olmoe_config

    small = tmp_path / "small-vocab"
    AutoModelForCausalLM.from_config(tiny_olmoe_config(64)).save_pretrained(small)
    tokenizer.save_pretrained(small)  # its ids run to len(tokenizer) - 1, far beyond 64

    def no_pass(*args, **kwargs):
        raise AssertionError("evaluation ran before the vocabulary was checked")

    monkeypatch.setattr(dynamo.pipeline, "token_perplexity", no_pass)
    status, _, err = cli("experiment=smoke", "logger=none", f"results_dir={tmp_path / 'runs'}", "model=local",
                         f"model.path={small}", "quant=fp16", "eval=ppl", "eval.seqlen=64", "eval.datasets=[code]")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and "the model's vocabulary has 64 rows" in errors[0], err[-2000:]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_pickle_that_would_run_code_is_refused_in_one_line(tmp_path, tiny_model_dir):
    """torch.load(weights_only=True) already refuses it (nothing runs); the refusal is one line, not a traceback."""
    import os
    import pickle

    from dynamo.errors import UserError

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    folder = _copy(tiny_model_dir, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError, match="a pickle that holds more than tensors"):
        _load(folder)
    assert not (tmp_path / "ran").exists()


def test_a_guarded_config_naming_an_unknown_base_model_type_is_one_line(tmp_path, packed):
    from dynamo.errors import UserError
    from dynamo.packed.format import KEY

    folder = _copy(packed[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config[KEY]["base_model_type"] = "no_such_family"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="names base model type 'no_such_family'"):
        _load(folder)
