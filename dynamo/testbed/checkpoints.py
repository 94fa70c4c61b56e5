"""Training checkpoints: safetensors + JSON (no pickles), written atomically; a resumed run continues bit
for bit (AdamW moments and step restored) at the same thread count."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..records import save_tensors_atomic, write_json_atomic


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
