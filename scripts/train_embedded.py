"""Train the embedded tokenizer and tiny MoE models from scratch on the known domains.

    python scripts/build_corpora.py                     # once: the training splits
    python scripts/train_embedded.py tokenizer          # byte-level BPE -> assets/tokenizer
    python scripts/train_embedded.py model tiny-olmoe   # -> assets/models/tiny-olmoe
    python scripts/train_embedded.py model tiny-qwen-moe
    python scripts/make_model_card.py                   # evaluates both, writes the cards

The architectures are transformers' own (OlmoeForCausalLM, Qwen2MoeForCausalLM), so
AutoModelForCausalLM.from_pretrained(<dir>) loads them like any hub checkpoint. Training is
one pass over a fixed token mix (see MIX_TOKENS), logged to <dir>/training.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, OlmoeConfig, PreTrainedTokenizerFast,
                          Qwen2MoeConfig)

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"
CACHE = Path(os.environ.get("DYNAMO_CACHE", Path.home() / ".cache" / "dynamo")) / "corpora"

SEED = 0
VOCAB_SIZE = 8192
SEQLEN = 512
EOS = "<|endoftext|>"
PAD = "<|pad|>"
# Known domains and how many training tokens each contributes (None: the whole training split).
# docs, speeches and literature hold 2.72 M, 2.11 M and 0.21 M tokens; code fills the mix to
# just over 10 M tokens, seen once.
MIX_TOKENS = {"code": 5_200_000, "docs": None, "speeches": None, "literature": None}
MIN_TOTAL_TOKENS = 10_000_000
TOKENIZER_SAMPLE_BYTES = 3_000_000  # per domain

COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=SEQLEN, rms_norm_eps=1e-6,
              tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=0.01,
              dtype="float16")
ARCHITECTURES = {
    # The paper's main family: many small routed experts, no shared expert.
    "tiny-olmoe": lambda ids: OlmoeConfig(**COMMON, **ids, intermediate_size=256, num_experts=16,
                                          num_experts_per_tok=4, norm_topk_prob=False),
    # Qwen1.5-MoE / DeepSeek-MoE shape: routed experts plus a sigmoid-gated shared expert.
    "tiny-qwen-moe": lambda ids: Qwen2MoeConfig(**COMMON, **ids, intermediate_size=512,
                                                moe_intermediate_size=256, shared_expert_intermediate_size=512,
                                                num_experts=16, num_experts_per_tok=2, norm_topk_prob=False,
                                                qkv_bias=True, decoder_sparse_step=1, mlp_only_layers=[]),
}
TRAIN = dict(batch_size=8, lr=2e-3, min_lr=2e-4, warmup_steps=100, weight_decay=0.1, grad_clip=1.0,
             eval_every=200, eval_windows=32)


def read_jsonl(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def train_tokenizer() -> None:
    texts = []
    for domain in MIX_TOKENS:
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


def training_windows(tokenizer) -> tuple[torch.Tensor, dict[str, int]]:
    """Tokenise each known domain up to its budget; cut into SEQLEN windows; shuffle."""
    windows, counts = [], {}
    for domain, budget in MIX_TOKENS.items():
        ids: list[int] = []
        for doc in read_jsonl(CACHE / domain / "train.jsonl"):
            ids += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
            if budget is not None and len(ids) >= budget:
                break
        ids = ids[:budget]
        counts[domain] = len(ids)
        n = len(ids) // SEQLEN
        windows.append(torch.tensor(ids[: n * SEQLEN]).view(n, SEQLEN))
    data = torch.cat(windows)
    if data.numel() < MIN_TOTAL_TOKENS:
        sys.exit(f"error: the training mix has {data.numel()} tokens, fewer than {MIN_TOTAL_TOKENS}; "
                 "raise MIX_TOKENS or rebuild the corpora")
    data = data[torch.randperm(len(data), generator=torch.Generator().manual_seed(SEED))]
    return data, counts


def eval_windows(tokenizer) -> dict[str, torch.Tensor]:
    """Held-out windows from each known domain's calib split, for the training curve."""
    out = {}
    for domain in MIX_TOKENS:
        ids: list[int] = []
        for doc in read_jsonl(ASSETS / "data" / domain / "calib.jsonl"):
            ids += tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
        n = min(len(ids) // SEQLEN, TRAIN["eval_windows"] // len(MIX_TOKENS))
        out[domain] = torch.tensor(ids[: n * SEQLEN]).view(n, SEQLEN)
    return out


@torch.no_grad()
def eval_loss(model, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    model.eval()
    out = {d: model(input_ids=w, labels=w, output_router_logits=False).loss.item() for d, w in windows.items()}
    model.train()
    return out


def train_model(name: str, max_steps: int | None) -> None:
    torch.manual_seed(SEED)
    random.seed(SEED)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(ASSETS / "tokenizer")
    ids = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = ARCHITECTURES[name](ids)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    data, counts = training_windows(tokenizer)
    held_out = eval_windows(tokenizer)
    bs = TRAIN["batch_size"]
    steps = len(data) // bs if max_steps is None else min(max_steps, len(data) // bs)
    print(f"{name}: {n_params / 1e6:.2f} M params, {data.numel() / 1e6:.2f} M tokens, {steps} steps", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=TRAIN["lr"], betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < TRAIN["warmup_steps"]:
            return TRAIN["lr"] * (step + 1) / TRAIN["warmup_steps"]
        progress = (step - TRAIN["warmup_steps"]) / max(1, steps - TRAIN["warmup_steps"])
        return TRAIN["min_lr"] + 0.5 * (TRAIN["lr"] - TRAIN["min_lr"]) * (1 + math.cos(math.pi * progress))

    curve, start = [], time.time()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        batch = data[step * bs:(step + 1) * bs]
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % TRAIN["eval_every"] == 0 or step == steps - 1:
            elapsed = time.time() - start
            point = {"step": step, "tokens": (step + 1) * bs * SEQLEN, "train_loss": round(out.loss.item(), 4),
                     "aux_loss": round(float(out.aux_loss), 4), "lr": lr_at(step), "seconds": round(elapsed, 1),
                     "held_out_loss": {d: round(v, 4) for d, v in eval_loss(model, held_out).items()}}
            curve.append(point)
            print(json.dumps(point), flush=True)

    out_dir = ASSETS / "models" / name
    model.config.output_router_logits = False
    model.to(torch.float16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log = {"model": name, "architecture": type(model).__name__, "params": n_params, "seed": SEED,
           "seqlen": SEQLEN, "train": TRAIN, "mix_tokens": counts, "total_tokens": int(data[: steps * bs].numel()),
           "steps": steps, "seconds": round(time.time() - start, 1), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "curve": curve}
    (out_dir / "training.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"saved {out_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("tokenizer")
    p = sub.add_parser("model")
    p.add_argument("name", choices=list(ARCHITECTURES))
    p.add_argument("--max-steps", type=int, default=None, help="stop early (smoke tests)")
    p.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if not (CACHE / "code" / "train.jsonl").exists():
        sys.exit(f"error: no training split under {CACHE}; run python scripts/build_corpora.py first")
    if args.what == "tokenizer":
        train_tokenizer()
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        train_model(args.name, args.max_steps)


if __name__ == "__main__":
    main()
