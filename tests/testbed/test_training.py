"""dynamo.testbed.training (scripts/train_embedded.py): a run stopped and resumed ends with the same weights
as one that never stopped.

Trained on the shipped calib splits (the real training splits are not in the repository) with a
toy architecture and recipe registered for the test; a few steps on the CPU.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2MoeConfig

from conftest import REPO
from dynamo.testbed import training, training_data
from dynamo.testbed.recipes import ARCHITECTURES, KNOWN, SEQLEN, VOCAB_SIZE, Recipe

TOY = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=SEQLEN, hidden_size=32, num_hidden_layers=2,
           num_attention_heads=2, num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=32,
           shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
           output_router_logits=True, router_aux_loss_coef=0.01, decoder_sparse_step=1, mlp_only_layers=[])
RECIPE = Recipe(mix_tokens={d: 20_000 for d in KNOWN}, min_total_tokens=10_000, epochs=2, batch_size=2,
                   lr=5e-3, min_lr=5e-4, warmup_steps=2, bos_windows=True, eval_every=4, eval_windows=4,
                   track_sensitivity=True)


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    corpora = tmp_path / "corpora"
    for domain in KNOWN:
        (corpora / domain).mkdir(parents=True)
        shutil.copy(REPO / "assets" / "data" / domain / "calib.jsonl", corpora / domain / "train.jsonl")
    assets = tmp_path / "assets"
    shutil.copytree(REPO / "assets" / "tokenizer", assets / "tokenizer")
    (assets / "data").symlink_to(REPO / "assets" / "data")  # the held-out windows: the calib splits
    monkeypatch.setattr(training_data, "CACHE", corpora)
    monkeypatch.setattr(training_data, "ASSETS", assets)
    monkeypatch.setitem(ARCHITECTURES, "toy", (lambda ids: Qwen2MoeConfig(**TOY, **ids), RECIPE))
    return tmp_path


def _train(sandbox, monkeypatch, root: str, **kwargs) -> None:
    monkeypatch.setattr(training, "CHECKPOINT_ROOT", sandbox / root)
    training.train_model("toy", max_steps=10, resume=kwargs.pop("resume", False), checkpoint_minutes=60,
                   stop_after_minutes=None, **kwargs)


@pytest.mark.slow
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(sandbox, monkeypatch):
    torch.set_num_threads(1)  # float sums depend on the thread count
    _train(sandbox, monkeypatch, "straight")
    straight = load_file(str(sandbox / "straight" / "toy" / "checkpoint" / "model.safetensors"))
    straight_log = json.loads((sandbox / "assets" / "models" / "toy" / "training.json").read_text())

    _train(sandbox, monkeypatch, "interrupted", stop_at_step=5)  # checkpoints and exits after step 5
    state = json.loads((sandbox / "interrupted" / "toy" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5 and "device" not in state["identity"]
    _train(sandbox, monkeypatch, "interrupted", resume=True)
    resumed = load_file(str(sandbox / "interrupted" / "toy" / "checkpoint" / "model.safetensors"))

    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    resumed_log = json.loads((sandbox / "assets" / "models" / "toy" / "training.json").read_text())
    strip = lambda curve: [{k: v for k, v in p.items() if k != "seconds"} for p in curve]  # noqa: E731
    assert strip(resumed_log["curve"]) == strip(straight_log["curve"])
    assert [p["step"] for p in straight_log["curve"]] == [0, 4, 8, 9]
    assert all("sensitivity" in p for p in straight_log["curve"])


def test_a_checkpoint_of_another_recipe_is_refused(sandbox, monkeypatch):
    _train(sandbox, monkeypatch, "ckpt", stop_at_step=1)
    other = Recipe(**{**asdict(RECIPE), "lr": 1e-3})
    monkeypatch.setitem(ARCHITECTURES, "toy", (lambda ids: Qwen2MoeConfig(**TOY, **ids), other))
    with pytest.raises(SystemExit, match="another recipe"):
        _train(sandbox, monkeypatch, "ckpt", resume=True)
