"""The testbed's training data: the tokenizer trained on the known domains, training windows per recipe
(from the corpora scripts/build_corpora.py builds under the cache), and held-out windows for the curve."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..config import REPO_ROOT
from ..eval.windows import cut_windows
from .corpora import DEFAULT_CACHE
from .recipes import EOS, KNOWN, PAD, SEED, SEQLEN, VOCAB_SIZE, Recipe

ASSETS = REPO_ROOT / "assets"
CACHE = DEFAULT_CACHE  # the training splits scripts/build_corpora.py writes
TOKENIZER_SAMPLE_BYTES = 3_000_000  # per domain


def read_jsonl(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def train_tokenizer() -> None:
    texts = []
    for domain in KNOWN:
        budget = TOKENIZER_SAMPLE_BYTES
        for doc in read_jsonl(CACHE / domain / "train.jsonl"):
            texts.append(doc)
            budget -= len(doc.encode())
            if budget <= 0:
                break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   model_max_length=SEQLEN)
    fast.save_pretrained(ASSETS / "tokenizer")
    print(f"tokenizer: {len(fast)} tokens -> {ASSETS / 'tokenizer'}")


def training_windows(tokenizer, recipe: Recipe) -> tuple[torch.Tensor, dict[str, int]]:
    """Tokenise each known domain up to its budget and cut it into windows (one epoch, unshuffled)."""
    bos = tokenizer.bos_token_id if recipe.bos_windows else None
    windows, counts = [], {}
    for domain, budget in recipe.mix_tokens.items():
        ids: list[int] = []
        for doc in read_jsonl(CACHE / domain / "train.jsonl"):
            ids += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
            if budget is not None and len(ids) >= budget:
                break
        ids = ids[:budget]
        counts[domain] = len(ids)
        windows.append(cut_windows(ids, SEQLEN, bos_id=bos))
    data = torch.cat(windows)
    if data.numel() < recipe.min_total_tokens:
        sys.exit(f"error: the training mix has {data.numel()} tokens, fewer than {recipe.min_total_tokens}; "
                 "raise the recipe's mix_tokens or rebuild the corpora")
    return data, counts


def epoch_order(n: int, epoch: int) -> torch.Tensor:
    """The window order of one epoch: a fixed permutation per (seed, epoch), so any step is reproducible."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(SEED + epoch))


def eval_windows(tokenizer, recipe: Recipe) -> dict[str, torch.Tensor]:
    """Held-out windows from each known domain's calib split, for the training curve."""
    bos = tokenizer.bos_token_id if recipe.bos_windows else None
    out = {}
    for domain in recipe.mix_tokens:
        ids: list[int] = []
        for doc in read_jsonl(ASSETS / "data" / domain / "calib.jsonl"):
            ids += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
        out[domain] = cut_windows(ids, SEQLEN, recipe.eval_windows // len(recipe.mix_tokens), bos)
    return out
