"""Train the embedded tokenizer and tiny MoE models from scratch on the known domains.

    python scripts/build_corpora.py                     # once: the training splits
    python scripts/train_embedded.py tokenizer          # byte-level BPE -> assets/tokenizer
    python scripts/train_embedded.py model tiny-olmoe   # -> assets/models/tiny-olmoe
    python scripts/train_embedded.py model tiny-qwen-moe
    python scripts/make_model_card.py                   # evaluates both, writes the cards

    # the quantization-realistic testbed: hours on 2 cores, in several sittings
    python scripts/train_embedded.py model testbed-qwen-moe --resume --stop-after-minutes 120
    python scripts/train_embedded.py model testbed-qwen-moe --device cuda   # on a GPU: minutes

The architectures are transformers' own (OlmoeForCausalLM, Qwen2MoeForCausalLM), so
AutoModelForCausalLM.from_pretrained(<dir>) loads them like any hub checkpoint. Each model has a
`Recipe` (token mix, epochs, optimiser, BOS windows); the tiny-* recipes are frozen so the shipped
models regenerate. Training checkpoints every few minutes to results/training/<name>/checkpoint/
(safetensors + JSON; `--resume` continues from it bit for bit at the same thread count) and
keeps the curve, with the sensitivity statistics where the recipe tracks them, in
results/training/<name>/curve.json; the finished model and <dir>/training.json go to
assets/models/<name>.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, OlmoeConfig, PreTrainedTokenizerFast,
                          Qwen2MoeConfig)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dynamo.eval.windows import cut_windows  # noqa: E402
from dynamo.records import save_tensors_atomic, write_json_atomic  # noqa: E402
ASSETS = REPO / "assets"
CACHE = Path(os.environ.get("DYNAMO_CACHE", Path.home() / ".cache" / "dynamo")) / "corpora"

SEED = 0
VOCAB_SIZE = 8192
SEQLEN = 512
EOS = "<|endoftext|>"
PAD = "<|pad|>"
TOKENIZER_SAMPLE_BYTES = 3_000_000  # per domain
KNOWN = ("code", "docs", "speeches", "literature")


@dataclass(frozen=True)
class Recipe:
    """How one model is trained. The tiny-* recipes are frozen: they regenerate the shipped models."""

    # tokens each known domain contributes per epoch (None: its whole training split)
    mix_tokens: dict = field(default_factory=lambda: {d: None for d in KNOWN})
    min_total_tokens: int = 10_000_000
    epochs: int = 1
    batch_size: int = 8
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1   # on 2-D weights except embeddings; never on norm gains or biases
    grad_clip: float = 1.0
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    # every window starts with the BOS token (<|endoftext|>): a fixed first token becomes the
    # attention sink real LLMs have (Sun et al. 2024; Gu et al. 2024)
    bos_windows: bool = False
    eval_every: int = 200
    eval_windows: int = 32
    track_sensitivity: bool = False  # outlier statistics and RTN-3bit loss at every eval point


COMMON = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=SEQLEN, rms_norm_eps=1e-6,
              tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=0.01,
              dtype="float16")
TINY = dict(COMMON, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
# The quantization-realistic testbed (shared/spec/TESTBED.md): many tokens per
# non-embedding parameter (several epochs over every known-domain token), Pre-Norm SwiGLU,
# BOS at every window start, AdamW at a high learning rate with eps 1e-8 and beta2 0.95, no
# weight decay on gains and embeddings. Sensitivity must come from training alone.
TESTBED = dict(COMMON, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
LEGACY_MIX = {"code": 5_200_000, "docs": None, "speeches": None, "literature": None}
TESTBED_RECIPE = Recipe(epochs=3, lr=5e-3, min_lr=5e-4, warmup_steps=500, bos_windows=True, eval_every=500,
                        track_sensitivity=True)
ARCHITECTURES = {
    # The paper's main family: many small routed experts, no shared expert.
    "tiny-olmoe": (lambda ids: OlmoeConfig(**TINY, **ids, intermediate_size=256, num_experts=16,
                                           num_experts_per_tok=4, norm_topk_prob=False),
                   Recipe(mix_tokens=LEGACY_MIX)),
    # Qwen1.5-MoE / DeepSeek-MoE shape: routed experts plus a sigmoid-gated shared expert.
    "tiny-qwen-moe": (lambda ids: Qwen2MoeConfig(**TINY, **ids, intermediate_size=512, moe_intermediate_size=256,
                                                 shared_expert_intermediate_size=512, num_experts=16,
                                                 num_experts_per_tok=2, norm_topk_prob=False, qkv_bias=True,
                                                 decoder_sparse_step=1, mlp_only_layers=[]),
                      Recipe(mix_tokens=LEGACY_MIX)),
    # Testbed, Qwen2-MoE family: no QK-norm (Qwen2-MoE has none), 8 experts top-2 (more tokens
    # per expert than top-4 of 16) and a shared expert; 3.8 M non-embedding parameters.
    "testbed-qwen-moe": (lambda ids: Qwen2MoeConfig(**TESTBED, **ids, intermediate_size=512,
                                                    moe_intermediate_size=256, shared_expert_intermediate_size=256,
                                                    num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                                                    qkv_bias=True, decoder_sparse_step=1, mlp_only_layers=[]),
                         TESTBED_RECIPE),
    # Testbed, OLMoE family (transformers' OLMoE always has QK-norm, as the real OLMoE does).
    "testbed-olmoe": (lambda ids: OlmoeConfig(**TESTBED, **ids, intermediate_size=256, num_experts=8,
                                              num_experts_per_tok=2, norm_topk_prob=False),
                      TESTBED_RECIPE),
}
CHECKPOINT_ROOT = Path(os.environ.get("DYNAMO_TRAIN_CHECKPOINTS", REPO / "results" / "training"))


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


@torch.no_grad()
def eval_loss(model, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    was_training = model.training
    model.eval()
    out = {d: model(input_ids=w, labels=w, output_router_logits=False).loss.item() for d, w in windows.items()}
    model.train(was_training)
    return out


@torch.no_grad()
def sensitivity_point(model, windows: dict[str, torch.Tensor], loss: dict[str, float]) -> dict:
    """Outlier statistics of the expert inputs and the held-out loss under RTN-3bit experts."""
    from dynamo.analysis.sensitivity import expert_input_outliers, fake_quantized_experts
    from dynamo.quant.spec import QSpec

    model.eval()
    outliers = expert_input_outliers(model, torch.cat(list(windows.values())))
    with fake_quantized_experts(model, QSpec(bits=3, group_size=128)):
        rtn = eval_loss(model, windows)
    model.train()
    mean_delta = sum(rtn[d] - loss[d] for d in loss) / len(loss)
    return {"rtn3_ppl_increase": round(math.exp(mean_delta) - 1, 5),
            "max_over_median_rms": [o["no_pos0"]["max_over_median_rms"] for o in outliers],
            "kurtosis": [o["no_pos0"]["kurtosis"] for o in outliers],
            "max_over_median_rms_with_pos0": [o["all"]["max_over_median_rms"] for o in outliers],
            "top_channels": [o["no_pos0"]["top_channels"] for o in outliers]}


# --- checkpoints: safetensors + JSON (no pickles), written atomically --------------------------

def save_checkpoint(folder: Path, model, opt, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                moments[f"{names[id(p)]}::exp_avg"] = st["exp_avg"]
                moments[f"{names[id(p)]}::exp_avg_sq"] = st["exp_avg_sq"]
                state.setdefault("adam_step", float(st["step"]))
    save_tensors_atomic(folder / "model.safetensors", {n: p.detach().cpu() for n, p in model.named_parameters()})
    save_tensors_atomic(folder / "optimizer.safetensors", {n: t.cpu() for n, t in moments.items()})
    write_json_atomic(folder / "state.json", state)  # last: a checkpoint counts only once its state is written


def load_checkpoint(folder: Path, model, opt) -> dict:
    state = json.loads((folder / "state.json").read_text())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(folder / "model.safetensors")).items():
            params[name].copy_(value)
    moments = load_file(str(folder / "optimizer.safetensors"))
    for name, p in params.items():
        if f"{name}::exp_avg" in moments:
            opt.state[p] = {"step": torch.tensor(state["adam_step"]), "exp_avg": moments[f"{name}::exp_avg"].to(p.device),
                            "exp_avg_sq": moments[f"{name}::exp_avg_sq"].to(p.device)}
    return state


def train_model(name: str, max_steps: int | None, resume: bool, checkpoint_minutes: float,
                stop_after_minutes: float | None, stop_at_step: int | None = None,
                device: torch.device | None = None) -> None:
    build, recipe = ARCHITECTURES[name]
    device = device or torch.device("cpu")
    torch.manual_seed(SEED)
    random.seed(SEED)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(ASSETS / "tokenizer")
    ids = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = build(ids)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_embedding = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    data, counts = training_windows(tokenizer, recipe)
    held_out = {d: w.to(device) for d, w in eval_windows(tokenizer, recipe).items()}
    bs = recipe.batch_size
    per_epoch = len(data) // bs
    steps = per_epoch * recipe.epochs if max_steps is None else min(max_steps, per_epoch * recipe.epochs)
    print(f"{name}: {n_params / 1e6:.2f} M params ({(n_params - n_embedding) / 1e6:.2f} M non-embedding), "
          f"{data.numel() / 1e6:.2f} M tokens x {recipe.epochs} epochs, {steps} steps", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=recipe.betas,
                            eps=recipe.eps)

    def lr_at(step: int) -> float:
        if step < recipe.warmup_steps:
            return recipe.lr * (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(1, steps - recipe.warmup_steps)
        return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * progress))

    folder = CHECKPOINT_ROOT / name
    # a GPU run's float sums differ from a CPU run's: its checkpoints resume only on a GPU (CPU identities
    # carry no device key, so the checkpoints written before GPUs were supported stay valid)
    on_gpu = {"device": "cuda"} if device.type == "cuda" else {}
    identity = json.loads(json.dumps({"model": name, "recipe": asdict(recipe), "steps": steps, "params": n_params,
                                      "torch": torch.__version__, **on_gpu}))  # as stored: tuples become lists
    first, curve, seconds = 0, [], 0.0
    if resume and (folder / "checkpoint" / "state.json").exists():
        state = load_checkpoint(folder / "checkpoint", model, opt)
        if state["identity"] != identity:
            sys.exit(f"error: the checkpoint in {folder / 'checkpoint'} was made by another recipe or torch "
                     "version; delete it to start over, or restore the recipe it was made with")
        first, curve, seconds = state["step"] + 1, state["curve"], state["seconds"]
        print(f"resumed at step {first} ({seconds / 3600:.2f} h trained so far)", flush=True)
    elif resume:
        print(f"no checkpoint under {folder}: starting from step 0", flush=True)

    def checkpoint(step: int) -> None:
        state = {"identity": identity, "step": step, "seconds": round(seconds + time.time() - start, 1),
                 "threads": torch.get_num_threads(), "curve": curve}
        save_checkpoint(folder / "checkpoint", model, opt, state)
        write_json_atomic(folder / "curve.json", {"model": name, "steps": steps, "curve": curve})

    start = last_save = time.time()
    model.train()
    order, order_epoch = None, -1
    for step in range(first, steps):
        epoch, i = divmod(step, per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(len(data), epoch), epoch
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        batch = data[order[i * bs:(i + 1) * bs]].to(device)
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % recipe.eval_every == 0 or step == steps - 1:
            loss = eval_loss(model, held_out)
            point = {"step": step, "epoch": epoch, "tokens": (step + 1) * bs * SEQLEN,
                     "train_loss": round(out.loss.detach().item(), 4), "aux_loss": round(float(out.aux_loss.detach()), 4),
                     "lr": lr_at(step), "seconds": round(seconds + time.time() - start, 1),
                     "held_out_loss": {d: round(v, 4) for d, v in loss.items()}}
            if recipe.track_sensitivity:
                point["sensitivity"] = sensitivity_point(model, held_out, loss)
            curve.append(point)
            print(json.dumps(point), flush=True)
        now = time.time()
        if now - last_save > 60 * checkpoint_minutes or step == steps - 1:
            checkpoint(step)
            last_save = now
        out_of_time = stop_after_minutes is not None and now - start > 60 * stop_after_minutes
        if (out_of_time or step == stop_at_step) and step < steps - 1:
            checkpoint(step)
            print(f"stopped at step {step}; continue with --resume", flush=True)
            return

    out_dir = ASSETS / "models" / name
    model.config.output_router_logits = False
    model.to("cpu", torch.float16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log = {"model": name, "architecture": type(model).__name__, "params": n_params,
           "non_embedding_params": n_params - n_embedding, "seed": SEED, "seqlen": SEQLEN,
           "train": asdict(recipe), "mix_tokens": counts, "total_tokens": int(steps * bs * SEQLEN),
           "tokens_per_non_embedding_param": round(steps * bs * SEQLEN / (n_params - n_embedding), 2),
           "steps": steps, "seconds": round(seconds + time.time() - start, 1), "threads": torch.get_num_threads(),
           **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}),
           "torch": torch.__version__, "curve": curve}
    (out_dir / "training.json").write_text(json.dumps(log, indent=2) + "\n")
    from dynamo.assets import pack  # weights and tokenizer are committed as .xz (dynamo/assets.py)

    pack(out_dir)
    print(f"saved {out_dir} (commit its *.xz; the plain weights are git-ignored)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("tokenizer")
    p = sub.add_parser("model")
    p.add_argument("name", choices=list(ARCHITECTURES))
    p.add_argument("--max-steps", type=int, default=None, help="stop early (smoke tests)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", action="store_true", help=f"continue from {CHECKPOINT_ROOT}/<name>/checkpoint")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--stop-after-minutes", type=float, default=None,
                   help="checkpoint and exit after this long (one sitting of a multi-session run)")
    p.add_argument("--stop-at-step", type=int, default=None, help="checkpoint and exit after this step")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where to train (training.json names the GPU)")
    args = parser.parse_args()
    if not (CACHE / "code" / "train.jsonl").exists():
        sys.exit(f"error: no training split under {CACHE}; run python scripts/build_corpora.py first")
    if args.what == "tokenizer":
        train_tokenizer()
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            sys.exit(f"error: --device {args.device} but no CUDA device is visible; train with --device cpu")
        train_model(args.name, args.max_steps, args.resume, args.checkpoint_minutes, args.stop_after_minutes,
                    args.stop_at_step, torch.device(args.device))


if __name__ == "__main__":
    main()
