"""The training loop of the embedded models: AdamW with warmup and cosine decay, a held-out curve (with the
sensitivity statistics where the recipe tracks them), checkpoints every few minutes, and the finished
model saved (and packed as .xz) under assets/models/<name>."""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from ..assets import pack
from ..config import REPO_ROOT
from ..quant.spec import QSpec
from ..records import write_json_atomic
from . import training_data
from .checkpoints import load_checkpoint, save_checkpoint
from .probes import expert_input_outliers, fake_quantized_experts
from .recipes import ARCHITECTURES, SEED, SEQLEN
from .training_data import epoch_order, eval_windows, training_windows

CHECKPOINT_ROOT = Path(os.environ.get("DYNAMO_TRAIN_CHECKPOINTS", REPO_ROOT / "results" / "training"))


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


def train_model(name: str, max_steps: int | None, resume: bool, checkpoint_minutes: float,
                stop_after_minutes: float | None, stop_at_step: int | None = None,
                device: torch.device | None = None) -> None:
    build, recipe = ARCHITECTURES[name]
    device = device or torch.device("cpu")
    torch.manual_seed(SEED)
    random.seed(SEED)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(training_data.ASSETS / "tokenizer")
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

    out_dir = training_data.ASSETS / "models" / name
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
    pack(out_dir)  # weights and tokenizer are committed as .xz (dynamo/assets.py)
    print(f"saved {out_dir} (commit its *.xz; the plain weights are git-ignored)")
