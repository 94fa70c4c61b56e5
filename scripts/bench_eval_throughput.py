"""Tokens/s of the harness's PPL evaluator against a plain transformers forward loop.

    python scripts/bench_eval_throughput.py [--model tiny-olmoe] [--windows 32] [--rounds 3]

Both run on the same windows of the same model in one process; rounds alternate between
them so machine noise hits both alike, and the ratio of medians is reported
(target >= 0.9). Writes results/benchmarks/eval_throughput.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from dynamo.config import REPO_ROOT, ModelConfig, SourceConfig, SourceKind
from dynamo.data import load_documents
from dynamo.eval.perplexity import make_windows, token_perplexity, tokenize_corpus
from dynamo.models import load_model
from dynamo.records import device_info, package_versions, write_json_atomic


@torch.no_grad()
def plain_loop(model, windows: torch.Tensor, batch_size: int) -> float:
    """What a user would write by hand: the model's own loss, averaged per batch."""
    losses = [model(input_ids=windows[i:i + batch_size], labels=windows[i:i + batch_size]).loss.item()
              for i in range(0, len(windows), batch_size)]
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-olmoe")
    parser.add_argument("--domain", default="code")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "benchmarks" / "eval_throughput.json")
    args = parser.parse_args()

    loaded = load_model(ModelConfig(name=args.model, path=str(REPO_ROOT / "assets" / "models" / args.model)))
    ids = tokenize_corpus(loaded.tokenizer, load_documents(SourceConfig(kind=SourceKind.embedded, path=args.domain),
                                                           "test"), "\n\n")
    windows = make_windows(ids, args.seqlen, args.windows, args.domain).to(loaded.device)
    tokens = windows.numel()
    token_perplexity(loaded.model, windows[: args.batch_size], args.batch_size)  # warm-up
    ours, plain = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        result = token_perplexity(loaded.model, windows, args.batch_size)
        ours.append(tokens / (time.perf_counter() - t))
        t = time.perf_counter()
        plain_nll = plain_loop(loaded.model, windows, args.batch_size)
        plain.append(tokens / (time.perf_counter() - t))
    report = {
        "benchmark": "eval_throughput",
        "command": "python scripts/bench_eval_throughput.py " + " ".join(sys.argv[1:]),
        "model": args.model, "domain": args.domain, "seqlen": args.seqlen, "windows": len(windows),
        "batch_size": args.batch_size, "rounds": args.rounds, "tokens_per_round": tokens,
        "ours_tokens_per_s": [round(x, 1) for x in ours],
        "plain_tokens_per_s": [round(x, 1) for x in plain],
        "ratio_of_medians": round(statistics.median(ours) / statistics.median(plain), 4),
        "target_ratio": 0.9,
        # Same windows, same model: the two mean losses must agree (equal batches, equal token counts).
        "ours_nll": round(result.nll, 6), "plain_nll": round(plain_nll, 6),
        "device": device_info(loaded.device), "versions": package_versions(),
    }
    write_json_atomic(args.out, report)
    print(f"ours {statistics.median(ours):.0f} tok/s, plain {statistics.median(plain):.0f} tok/s, "
          f"ratio {report['ratio_of_medians']:.3f} -> {args.out}")


if __name__ == "__main__":
    main()
