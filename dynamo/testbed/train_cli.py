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
import sys

import torch

from . import training, training_data
from .recipes import ARCHITECTURES
from .training_data import train_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("tokenizer")
    p = sub.add_parser("model")
    p.add_argument("name", choices=list(ARCHITECTURES))
    p.add_argument("--max-steps", type=int, default=None, help="stop early (smoke tests)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", action="store_true", help=f"continue from {training.CHECKPOINT_ROOT}/<name>/checkpoint")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--stop-after-minutes", type=float, default=None,
                   help="checkpoint and exit after this long (one sitting of a multi-session run)")
    p.add_argument("--stop-at-step", type=int, default=None, help="checkpoint and exit after this step")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where to train (training.json names the GPU)")
    args = parser.parse_args(argv)
    if not (training_data.CACHE / "code" / "train.jsonl").exists():
        sys.exit(f"error: no training split under {training_data.CACHE}; run python scripts/build_corpora.py first")
    if args.what == "tokenizer":
        train_tokenizer()
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            sys.exit(f"error: --device {args.device} but no CUDA device is visible; train with --device cpu")
        training.train_model(args.name, args.max_steps, args.resume, args.checkpoint_minutes,
                             args.stop_after_minutes, args.stop_at_step, torch.device(args.device))
