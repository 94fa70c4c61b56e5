"""KL(FP16 || quantized) and top-1 agreement from reference log-probs kept on disk."""

import pytest
import torch

from dynamo.eval.fidelity import ReferenceLogprobs


def _logits(seed: int, shape=(6, 9, 50), scale=3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _exact(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-window mean KL(p || q) over predicted tokens, in float64."""
    lp = torch.log_softmax(p_logits[:, :-1].double(), -1)
    lq = torch.log_softmax(q_logits[:, :-1].double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean(1)


def _run(ref: ReferenceLogprobs, p_logits, q_logits, batch=4):
    windows = torch.zeros(p_logits.shape[:2], dtype=torch.long)
    record = ref.recorder("d", windows, p_logits.shape[-1])
    logp = torch.log_softmax(p_logits[:, :-1], -1)   # what token_perplexity hands the meter
    logq = torch.log_softmax(q_logits[:, :-1], -1)
    for start in range(0, len(p_logits), batch):
        record(start, logp[start:start + batch])
    compare, out = ref.comparer("d", windows)
    for start in range(0, len(q_logits), batch):
        compare(start, logq[start:start + batch])
    return out


def test_full_vocab_kl_matches_exact_and_files_are_removed():
    p, q = _logits(0), _logits(0) + 0.5 * _logits(1, scale=1.0)
    with ReferenceLogprobs() as ref:
        out = _run(ref, p, q)
        assert ref.nbytes >= 6 * 8 * 50 * 2  # fp16 log-probs of every predicted token, on disk
        directory = ref.dir
    assert not directory.exists()
    assert out.kl == pytest.approx(_exact(p, q).tolist(), rel=2e-2, abs=1e-3)
    agree = (p[:, :-1].argmax(-1) == q[:, :-1].argmax(-1)).double().mean(1)
    assert out.top1 == pytest.approx(agree.tolist())
    assert 0 < out.mean_top1 < 1


def test_identical_model_has_no_damage():
    p = _logits(2)
    with ReferenceLogprobs() as ref:
        out = _run(ref, p, p.clone())
    assert max(out.kl) < 2e-3 and out.mean_top1 == 1.0


def test_topk_is_a_lower_bound_and_exact_at_full_width():
    p, q = _logits(3), _logits(3) + _logits(4, scale=1.0)
    with ReferenceLogprobs(topk=50) as full_k, ReferenceLogprobs() as full, ReferenceLogprobs(topk=5) as top5:
        a, b, c = _run(full_k, p, q), _run(full, p, q), _run(top5, p, q)
    assert a.kl == pytest.approx(b.kl, rel=1e-2, abs=1e-3)
    assert all(x <= y + 1e-3 for x, y in zip(c.kl, b.kl))
    assert c.mean_kl > 0.2 * b.mean_kl  # the top 5 of sharp distributions carry most of the KL
    assert c.top1 == b.top1


def test_comparer_refuses_other_windows_or_missing_reference():
    p = _logits(5)
    with ReferenceLogprobs() as ref:
        _run(ref, p, p)
        with pytest.raises(RuntimeError, match="reference covers"):
            ref.comparer("d", torch.zeros(3, 9, dtype=torch.long))
        with pytest.raises(RuntimeError, match="no complete reference"):
            ref.comparer("other", torch.zeros(6, 9, dtype=torch.long))


class _LM(torch.nn.Module):
    def __init__(self, vocab=40, hidden=8):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = torch.nn.Embedding(vocab, hidden), torch.nn.Linear(hidden, vocab)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": self.head(self.emb(input_ids)) * 4})()


def test_the_meter_sees_the_losses_log_probs_and_leaves_ppl_unchanged():
    from dynamo.eval.perplexity import token_perplexity

    model, windows = _LM(), torch.randint(0, 40, (5, 7), generator=torch.Generator().manual_seed(1))
    plain = token_perplexity(model, windows, batch_size=2)
    with ReferenceLogprobs() as ref:
        recorded = token_perplexity(model, windows, batch_size=2, on_logprobs=ref.recorder("d", windows, 40))
        compare, out = ref.comparer("d", windows)
        compared = token_perplexity(model, windows, batch_size=2, on_logprobs=compare)
    assert recorded.window_nll == pytest.approx(plain.window_nll, rel=1e-6)
    assert compared.ppl == pytest.approx(plain.ppl, rel=1e-6)
    assert max(out.kl) < 1e-3 and out.mean_top1 == 1.0 and len(out.kl) == 5
