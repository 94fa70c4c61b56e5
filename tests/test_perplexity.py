"""Token perplexity: the protocol, exact arithmetic, and its errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dynamo.errors import UserError
from dynamo.eval.perplexity import make_windows, token_perplexity, tokenize_corpus


class UniformLM(torch.nn.Module):
    """Predicts every token with probability 1/V: its perplexity is exactly V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 4)
        self.vocab = vocab

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    windows = torch.randint(0, 50, (5, 16))
    result = token_perplexity(UniformLM(50), windows, batch_size=2)
    assert result.ppl == pytest.approx(50.0, rel=1e-6)
    assert result.predicted_tokens == 5 * 15 and result.windows == 5


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = torch.arange(103)
    windows = make_windows(ids, 10, None)
    assert windows.shape == (10, 10) and torch.equal(windows.flatten(), torch.arange(100))
    assert make_windows(ids, 10, 3).shape == (3, 10)


def test_corpus_shorter_than_a_window_is_a_clear_error():
    with pytest.raises(UserError, match="eval.seqlen=64"):
        make_windows(torch.arange(10), 64, None, "tiny")


def test_matches_token_by_token_reference_on_a_real_model(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = tokenize_corpus(tokenizer, ["def f(x):\n    return x + 1\n", "Call me Ishmael."] * 20, "\n\n")
    windows = make_windows(ids, 32, 6)
    result = token_perplexity(model, windows, batch_size=4)
    nll = []
    with torch.no_grad():
        for w in windows:  # one window at a time, loss summed by hand
            logits = model(input_ids=w[None]).logits[0]
            nll += F.cross_entropy(logits[:-1], w[1:], reduction="none").tolist()
    assert result.nll == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    # batch size must not change the number
    assert token_perplexity(model, windows, batch_size=1).ppl == pytest.approx(result.ppl, rel=1e-5)
