"""The evaluation behind a model card: token PPL per embedded domain on the shipped test splits (the harness's
own evaluator), an add-one unigram baseline for scale, and the routing evidence that experts specialise (per
layer, the Jensen-Shannon divergence between the expert-selection distributions of each pair of domains)."""

from __future__ import annotations

import itertools
import math

import torch

from ..config import REPO_ROOT, ModelConfig, SourceConfig, SourceKind
from ..data import embedded_split, load_documents
from ..eval.perplexity import make_windows, token_perplexity, tokenize_corpus
from ..models import load_model
from ..switching.detector import js_divergence
from ..tokens import bos_id_as_trained
from .probes import routing_frequencies

KNOWN, _NOVEL = embedded_split()
DOMAINS = KNOWN + _NOVEL  # the card's row order: known domains first
SEQLEN = 512
SEPARATOR = "\n\n"


def unigram_ppl(train_ids: torch.Tensor, test_windows: torch.Tensor, vocab: int) -> float:
    """Add-one unigram model fitted on the known domains' calib splits, scored like the LM."""
    probs = (torch.bincount(train_ids, minlength=vocab).double() + 1) / (train_ids.numel() + vocab)
    targets = test_windows[:, 1:].flatten()
    return math.exp(float(-probs[targets].log().mean()))


def evaluate(name: str) -> dict:
    model_cfg = ModelConfig(name=name, path=str(REPO_ROOT / "assets" / "models" / name))
    loaded = load_model(model_cfg)
    model, tok = loaded.model, loaded.tokenizer
    bos = bos_id_as_trained(model_cfg, tok)  # evaluated as trained: BOS + 511 tokens
    source = {d: SourceConfig(kind=SourceKind.embedded, path=d) for d in DOMAINS}
    unigram_train = torch.cat([tokenize_corpus(tok, load_documents(source[d], "calib"), SEPARATOR) for d in KNOWN])
    rows, freqs = {}, {}
    for domain in DOMAINS:
        ids = tokenize_corpus(tok, load_documents(source[domain], "test"), SEPARATOR)
        windows = make_windows(ids, SEQLEN, None, domain, bos_id=bos)
        result = token_perplexity(model, windows, batch_size=8)
        rows[domain] = {"role": "known" if domain in KNOWN else "novel", "token_ppl": round(result.ppl, 3),
                        "unigram_ppl": round(unigram_ppl(unigram_train, windows, len(tok)), 3),
                        "windows": result.windows, "predicted_tokens": result.predicted_tokens}
        freqs[domain] = routing_frequencies(model, windows, model.config.num_experts_per_tok)
        print(f"{name} {domain:>10}: ppl {result.ppl:9.2f}  unigram {rows[domain]['unigram_ppl']:9.2f}", flush=True)
    n_layers = next(iter(freqs.values())).shape[0]
    jsd = {f"{a}|{b}": [round(js_divergence(freqs[a][layer], freqs[b][layer]), 4) for layer in range(n_layers)]
           for a, b in itertools.combinations(DOMAINS, 2)}
    return {"model": name, "seqlen": SEQLEN, "split": "test", "bos_windows": bos is not None, "domains": rows,
            "routing_jsd_bits": jsd,
            "expert_share": {d: [[round(x, 4) for x in layer.tolist()] for layer in f] for d, f in freqs.items()}}
