"""dynamo/tokens.py: each split tokenized once per run, and BOS windows for models trained on them."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dynamo.calibration.stage import calibration_windows
from dynamo.config import CalibConfig, ModelConfig, SourceConfig
from dynamo.errors import UserError
from dynamo.eval.perplexity import token_perplexity
from dynamo.tokens import RunTokens, bos_id_for

SOURCES = {name: SourceConfig(path=name) for name in ("code", "chat")}
BOS = 0  # <|endoftext|> in the shipped tokenizer: its bos_token


class CountingTokenizer:
    """The tokenizer, counting the texts it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, Counter()

    def __call__(self, text, **kwargs):
        self.calls[hash(text)] += 1
        return self.tokenizer(text, **kwargs)


def test_a_split_is_tokenized_once_whatever_windows_are_cut_from_it(tokenizer):
    counting = CountingTokenizer(tokenizer)
    tokens = RunTokens(counting, SOURCES)
    a = tokens.windows("code", "calib", 64, 4)
    b = tokens.windows("code", "calib", 32, None)
    calibration_windows(tokens, ["code", "chat"], OmegaConf.structured(CalibConfig(windows=2, seqlen=16)))
    assert sum(counting.calls.values()) == 2 and set(counting.calls.values()) == {1}  # code and chat, once each
    ids = tokens.split("code", "calib").ids
    assert torch.equal(a.flatten(), ids[:4 * 64]) and torch.equal(b.flatten(), ids[:len(b) * 32])


def test_bos_windows_open_with_bos_and_hold_seqlen_minus_one_stream_tokens(tokenizer):
    plain, bos = RunTokens(tokenizer, SOURCES), RunTokens(tokenizer, SOURCES, bos_id=BOS)
    ids = plain.split("code", "test").ids
    windows = bos.windows("code", "test", 64, 5)
    assert windows.shape == (5, 64) and (windows[:, 0] == BOS).all()
    # the stream continues from one window to the next, 63 tokens each, nothing skipped or repeated
    assert torch.equal(windows[:, 1:].flatten(), ids[:5 * 63])
    assert bos.available_windows("code", "test", 64) == ids.numel() // 63
    assert plain.available_windows("code", "test", 64) == ids.numel() // 64
    calib = calibration_windows(bos, ["chat"], OmegaConf.structured(CalibConfig(windows=3, seqlen=32)))["chat"]
    assert calib.shape == (3, 32) and (calib[:, 0] == BOS).all()


def test_a_bos_window_predicts_seqlen_minus_one_tokens_all_of_the_stream_never_bos(tokenizer):
    """The loss of a BOS window is over its seqlen - 1 stream tokens: the first one is predicted from BOS alone."""
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(len(tokenizer), 4)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids, use_cache=False):
            seen.append(input_ids.clone())
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, len(tokenizer))})()

    windows = RunTokens(tokenizer, SOURCES, bos_id=BOS).windows("code", "test", 32, 3)
    result = token_perplexity(Recorder(), windows, batch_size=2, on_logprobs=lambda start, logprobs: None)
    assert result.predicted_tokens == 3 * 31 and len(result.window_nll) == 3
    assert result.ppl == pytest.approx(len(tokenizer))  # uniform logits: every predicted token counted once
    assert torch.equal(torch.cat(seen), windows)


def test_bos_windows_need_a_tokenizer_with_bos(tokenizer):
    assert bos_id_for(ModelConfig(name="m", path="p"), tokenizer) is None
    assert bos_id_for(ModelConfig(name="m", path="p", bos_windows=True), tokenizer) == BOS
    no_bos = type("T", (), {"bos_token_id": None})()
    with pytest.raises(UserError, match="model.bos_windows=true but m's tokenizer has no BOS token"):
        bos_id_for(ModelConfig(name="m", path="p", bos_windows=True), no_bos)


def test_a_checkpoint_trained_with_bos_refuses_plain_windows(tmp_path, tokenizer):
    (tmp_path / "training.json").write_text(json.dumps({"train": {"bos_windows": True}}))
    with pytest.raises(UserError, match="trained with a BOS token opening every window.*set model.bos_windows=true"):
        bos_id_for(ModelConfig(name="testbed", path=str(tmp_path)), tokenizer)
    assert bos_id_for(ModelConfig(name="testbed", path=str(tmp_path), bos_windows=True), tokenizer) == BOS
    (tmp_path / "training.json").write_text(json.dumps({"train": {"lr": 0.002}}))  # the tiny models: before BOS
    with pytest.raises(UserError, match="trained on plain windows.*set model.bos_windows=false"):
        bos_id_for(ModelConfig(name="tiny", path=str(tmp_path), bos_windows=True), tokenizer)


def test_the_bos_key_at_its_default_keeps_old_hashes():
    from dynamo.records import config_hash

    config = {"model": {"name": "m", "path": "p", "bos_windows": False}, "seed": 0}
    assert config_hash(config) == config_hash({"model": {"name": "m", "path": "p"}, "seed": 0})
    assert config_hash({**config, "model": {**config["model"], "bos_windows": True}}) != config_hash(config)


@pytest.mark.slow  # a whole run; the BOS windows are checked fast above
def test_a_bos_run_evaluates_fp16_and_quantized_on_the_same_windows(cli, tmp_path, tiny_model_dir, monkeypatch):
    """model.bos_windows=true end to end: the record says so, every split is tokenized once, and the
    FP16 reference and the quantized pass score the same windows, so their per-window losses pair up."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    from dynamo import stats

    calls = Counter()
    tokenize = PreTrainedTokenizerBase.__call__

    def counting(self, text=None, *args, **kwargs):  # every tokenizer call of the run, wherever it comes from
        if isinstance(text, str) and len(text) > 10_000:  # a whole split, not a word
            calls[hash(text)] += 1
        return tokenize(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", counting)
    status, _, err = cli("experiment=smoke", "logger=none", f"results_dir={tmp_path}", "model=local",
                         f"model.path={tiny_model_dir}", "model.bos_windows=true", "quant=gptq_3bit", "eval=ppl",
                         "eval.datasets=[code,chat]", "eval.seqlen=64", "calib.seqlen=64")
    assert status == 0, err[-3000:]
    (path,) = tmp_path.rglob("result.json")
    record = json.loads(path.read_text())
    # test splits of code and chat, calib splits of the four known datasets (GPTQ): each once
    assert len(calls) == 6 and set(calls.values()) == {1}, calls
    for name, protocol in record["protocol"]["ppl"].items():
        assert protocol["bos_id"] == BOS and protocol["seqlen"] == 64
        assert protocol["predicted_tokens"] == protocol["windows"] * 63
        assert protocol["available_windows"] == protocol["corpus_tokens"] // 63
    fp16 = json.loads((path.parent / "window_nll_fp16.json").read_text())
    run = json.loads((path.parent / "window_nll.json").read_text())
    kl = json.loads((path.parent / "window_kl.json").read_text())
    for name in ("code", "chat"):
        assert len(fp16[name]) == len(run[name]) == len(kl[name]) == record["protocol"]["ppl"][name]["windows"]
        interval = stats.ppl_ratio(np.array(fp16[name]), np.array(run[name]))  # run / FP16, paired by window
        assert interval.estimate == pytest.approx(record["metrics"]["ppl"][name] / record["metrics"]["ppl_fp16"][name])
