"""Cost of a routed calibration pass against a plain forward over the same windows.

    python scripts/bench_calibration.py [--model tiny-olmoe] [--windows 16] [--rounds 3]

Rounds alternate plain forward / capture on the same windows in one process (ratio of
medians; target <= 1.5x). Peak extra memory is the size of the statistics the capture
keeps (Hessians and channel sums), measured from the tensors themselves, plus the peak
RSS growth of the process during the capture. Writes
results/benchmarks/calibration_overhead.json.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from dynamo.calibration import capture
from dynamo.config import REPO_ROOT, ModelConfig, SourceConfig, SourceKind
from dynamo.data import load_documents
from dynamo.eval.perplexity import make_windows, tokenize_corpus
from dynamo.models import load_model
from dynamo.records import device_info, package_versions, write_json_atomic


def stats_bytes(stats) -> int:
    total = 0
    for layer in stats.layers.values():
        for group in (layer.routed, layer.shared):
            if group is not None:
                total += sum(t.numel() * t.element_size() for t in group.tensors("x").values())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-olmoe")
    parser.add_argument("--domain", default="code")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-hessians", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "benchmarks" / "calibration_overhead.json")
    args = parser.parse_args()

    loaded = load_model(ModelConfig(name=args.model, path=str(REPO_ROOT / "assets" / "models" / args.model)))
    model = loaded.model
    ids = tokenize_corpus(loaded.tokenizer, load_documents(SourceConfig(kind=SourceKind.embedded, path=args.domain),
                                                           "calib"), "\n\n")
    windows = make_windows(ids, args.seqlen, args.windows, args.domain).to(loaded.device)

    @torch.no_grad()
    def plain() -> None:
        for i in range(0, len(windows), args.batch_size):
            model(input_ids=windows[i:i + args.batch_size], use_cache=False)

    plain()  # warm-up
    plain_s, capture_s = [], []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.rounds):
        t = time.perf_counter()
        plain()
        plain_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        stats = capture(model, windows, batch_size=args.batch_size, hessians=not args.no_hessians)
        capture_s.append(time.perf_counter() - t)
    rss_growth_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    tokens = windows.numel()
    report = {
        "benchmark": "calibration_overhead",
        "command": "python scripts/bench_calibration.py " + " ".join(sys.argv[1:]),
        "model": args.model, "domain": args.domain, "windows": len(windows), "seqlen": args.seqlen,
        "batch_size": args.batch_size, "rounds": args.rounds, "hessians": not args.no_hessians,
        "plain_forward_s": [round(x, 3) for x in plain_s], "capture_s": [round(x, 3) for x in capture_s],
        "plain_tokens_per_s": round(tokens / statistics.median(plain_s), 1),
        "capture_tokens_per_s": round(tokens / statistics.median(capture_s), 1),
        "ratio_of_medians": round(statistics.median(capture_s) / statistics.median(plain_s), 3),
        "target_ratio": 1.5,
        "stats_bytes": stats_bytes(stats),
        "peak_rss_growth_bytes": rss_growth_kb * 1024,
        "device": device_info(loaded.device), "versions": package_versions(),
    }
    write_json_atomic(args.out, report)
    print(f"plain {report['plain_tokens_per_s']:.0f} tok/s, capture {report['capture_tokens_per_s']:.0f} tok/s, "
          f"ratio {report['ratio_of_medians']:.2f}, stats {report['stats_bytes'] / 1e6:.1f} MB -> {args.out}")


if __name__ == "__main__":
    main()
