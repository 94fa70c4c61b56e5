"""What the KL-to-FP16 metric costs: evaluation time with and without it, in one process.

    OMP_NUM_THREADS=1 python scripts/bench_fidelity.py [--model tiny-olmoe] [--windows 32] [--rounds 3]

A quantized run with eval.reference evaluates three passes over the same windows: the FP16
reference, BQ and BQ + DQS. With KL, the reference pass also writes its log-probs to disk and
the two later passes read them back and compare. Per round (rounds interleave, so machine noise
hits both alike) this times on the same windows: a plain pass (token_perplexity), a recording
pass and a comparing pass, and reports the run-level ratio
(record + 2 x compare) / (3 x plain) from the medians (target <= 1.25), with each part's
ratio, the reference's disk bytes, and --topk if given. Writes results/benchmarks/fidelity_overhead.json.
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
from dynamo.eval.fidelity import ReferenceLogprobs
from dynamo.eval.perplexity import make_windows, token_perplexity, tokenize_corpus
from dynamo.models import load_model
from dynamo.records import device_info, package_versions, write_json_atomic

TARGET = 1.25


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-olmoe")
    parser.add_argument("--domain", default="email")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--topk", type=int, default=None, help="eval.kl_topk (default: the full vocabulary)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "benchmarks" / "fidelity_overhead.json")
    args = parser.parse_args()
    started = time.perf_counter()

    loaded = load_model(ModelConfig(name=args.model, path=str(REPO_ROOT / "assets" / "models" / args.model)))
    source = SourceConfig(kind=SourceKind.embedded, path=args.domain)
    ids = tokenize_corpus(loaded.tokenizer, load_documents(source, "test"), source.separator)
    windows = make_windows(ids, args.seqlen, args.windows, args.domain)
    vocab = loaded.model.get_output_embeddings().out_features

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    token_perplexity(loaded.model, windows[: args.batch_size], args.batch_size)  # warm-up
    times = {"plain": [], "record": [], "compare": []}
    nbytes = 0
    for _ in range(args.rounds):
        with ReferenceLogprobs(args.topk) as ref:
            times["plain"].append(timed(lambda: token_perplexity(loaded.model, windows, args.batch_size)))
            rec = ref.recorder(args.domain, windows, vocab)
            times["record"].append(timed(lambda: token_perplexity(loaded.model, windows, args.batch_size,
                                                                  on_logprobs=rec)))
            cmp, _ = ref.comparer(args.domain, windows)
            times["compare"].append(timed(lambda: token_perplexity(loaded.model, windows, args.batch_size,
                                                                   on_logprobs=cmp)))
            nbytes = ref.nbytes
    med = {k: statistics.median(v) for k, v in times.items()}
    run_ratio = (med["record"] + 2 * med["compare"]) / (3 * med["plain"])
    result = {
        "benchmark": "fidelity_overhead", "command": "python scripts/bench_fidelity.py " + " ".join(sys.argv[1:]),
        "model": args.model, "domain": args.domain, "windows": len(windows), "seqlen": args.seqlen,
        "batch_size": args.batch_size, "rounds": args.rounds, "topk": args.topk, "vocab": vocab,
        "seconds": times, "median_s": med,
        "record_over_plain": med["record"] / med["plain"], "compare_over_plain": med["compare"] / med["plain"],
        "run_eval_over_plain": run_ratio, "target": TARGET, "within_target": run_ratio <= TARGET,
        "reference_nbytes": nbytes, "reference_nbytes_per_window": nbytes // len(windows),
        "wall_s": round(time.perf_counter() - started, 1), "threads": torch.get_num_threads(),
        "device": device_info(torch.device("cpu")), "versions": package_versions(),
    }
    write_json_atomic(args.out, result)
    print(f"plain {med['plain']:.2f} s, record {med['record']:.2f} s, compare {med['compare']:.2f} s per "
          f"{len(windows)} windows; run-level eval x{run_ratio:.3f} (target <= {TARGET}); "
          f"reference {nbytes / 2**20:.1f} MiB -> {args.out}")


if __name__ == "__main__":
    main()
