"""The exported artifacts side by side: bytes on disk, bytes in memory, evaluation speed, PPL.

    OMP_NUM_THREADS=1 python scripts/bench_export.py [--bits 3] [--windows 8] [--rounds 3]

The embedded tiny-olmoe at float32 (the harness's CPU dtype), every routed expert RTN at --bits
(groups of 128), written as the dequantized export (what any tool loads) and the packed export
(what this harness loads), each reloaded the way a user would: AutoModelForCausalLM.from_pretrained
and dynamo.packed.hf_quantizer.load_packed. Both score the same --windows test windows of code
(seqlen 256) in one process, rounds alternating so machine noise hits both alike; the ratio of
median seconds is packed over dequantized. On CPU the packed experts run through the torch
reference (dynamo_kernels.dispatch), so this is the CPU cost of the packed format, not the GPU kernels'
speed (scripts/bench_kernels.py). Writes results/benchmarks/export.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dynamo.config import REPO_ROOT, SourceConfig
from dynamo.data import load_documents
from dynamo.eval.perplexity import make_windows, token_perplexity, tokenize_corpus
from dynamo.export.dequantized import save_dequantized
from dynamo.export.files import nbytes
from dynamo.export.packed import save_packed
from dynamo.quant import QSpec, QuantPlan, apply_plan, bit_accounting
from dynamo.records import device_info, package_versions, write_json_atomic

MODEL = REPO_ROOT / "assets" / "models" / "tiny-olmoe"


def param_nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "benchmarks" / "export.json")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynamo.packed.hf_quantizer import load_packed
    from dynamo.packed.model import attach_packed, pack_experts

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    source = SourceConfig(path="code")
    ids = tokenize_corpus(tokenizer, load_documents(source, "test"), source.separator)
    windows = make_windows(ids, 256, args.windows, "code")
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    fp_nbytes = param_nbytes(model)
    plan = QuantPlan(method="rtn", default=QSpec(args.bits, group_size=128))
    report = apply_plan(model, plan, keep_codes=True)
    avg_bits = bit_accounting(model, plan.spec_for)["experts"]
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        dequantized_dir, packed_dir = Path(tmp) / "dequantized", Path(tmp) / "packed"
        save_dequantized(model, tokenizer, dequantized_dir, {"format": "dequantized", "quant": f"rtn_{args.bits}bit",
                                                             "method": "rtn", "avg_bits_experts": avg_bits,
                                                             "avg_bits_experts_codes_only": float(args.bits),
                                                             "switched_to": None, "dtype": "float32",
                                                             "source_model": str(MODEL), "git_commit": None})
        attach_packed(model, pack_experts(model, report.codes))
        save_packed(model, tokenizer, packed_dir)
        del model, report
        loaded = {"dequantized": AutoModelForCausalLM.from_pretrained(dequantized_dir).eval(),
                  "packed": load_packed(packed_dir).eval()}
        disk = {"dequantized": nbytes(dequantized_dir), "packed": nbytes(packed_dir)}
    seconds: dict[str, list[float]] = {name: [] for name in loaded}
    ppl = {}
    for _ in range(args.rounds):
        for name, m in loaded.items():
            t = time.perf_counter()
            ppl[name] = token_perplexity(m, windows, batch_size=4).ppl
            seconds[name].append(time.perf_counter() - t)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    memory = {name: param_nbytes(m) for name, m in loaded.items()}
    tokens = windows.numel()
    out = {
        "benchmark": "export", "command": "OMP_NUM_THREADS=1 python scripts/bench_export.py " + " ".join(sys.argv[1:]),
        "model": "tiny-olmoe", "dtype": "float32", "bits": args.bits, "group_size": 128, "avg_bits_experts": avg_bits,
        "windows": len(windows), "seqlen": windows.shape[1], "rounds": args.rounds,
        "fp32_param_nbytes": fp_nbytes,
        "checkpoint_nbytes": disk,
        "param_nbytes": memory,
        "ppl": ppl, "ppl_packed_over_dequantized": ppl["packed"] / ppl["dequantized"],
        "seconds": seconds, "tokens_per_s": {name: tokens / s for name, s in median.items()},
        "packed_over_dequantized": {"checkpoint_nbytes": disk["packed"] / disk["dequantized"],
                                    "param_nbytes": memory["packed"] / memory["dequantized"],
                                    "median_seconds": median["packed"] / median["dequantized"]},
        "device": device_info(torch.device("cpu")), "versions": package_versions(),
    }
    write_json_atomic(args.out, out)
    print({k: out[k] for k in ("checkpoint_nbytes", "ppl", "tokens_per_s", "packed_over_dequantized")})


if __name__ == "__main__":
    main()
