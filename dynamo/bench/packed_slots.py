"""The adaptive switch on the packed model: equal to the fake-quantized model, its forward cost, a switch by name.

    OMP_NUM_THREADS=2 python scripts/bench_packed_slots.py [--model testbed-qwen-moe] [--repeats 5]

BQ is RTN at --bits (uniform, group 128: the packed format's arithmetic is what is measured, not the
plan) packed once; the fake-quantized twin holds exactly the packed values (`write_dequantized`). For each
novel domain the adaptive switch (the harness's defaults: rows + columns, Hessian scoring, 8-bit slots,
1% of the experts' FP16 bytes) is computed on the fake-quantized model from the first --switch-windows
calib windows and written into both: the dense weights, and the packed model's slot tables (a copy of the
same slot set). On --test-windows test windows of the domain (BOS-led as the model was trained):
- token PPL and mean KL(FP16 || model) of both, and their relative differences (target 1e-4);
- the packed forward with the slot table against without it (BQ alone), interleaved, median of
  --repeats (CPU torch path; target <= 1.10);
- the switch from the saved set on disk (slot_sets/, checked load + copy), whole model (target <= 10 ms).
Writes results/benchmarks/packed_slots_<model>.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..config import REPO_ROOT, ModelConfig, SourceConfig
from ..data import embedded_split
from ..eval.fidelity import ReferenceLogprobs
from ..eval.perplexity import token_perplexity
from ..packed.model import attach_packed, pack_experts, write_dequantized
from ..quant import QSpec, QuantPlan, apply_plan
from ..records import device_info, package_versions, write_json_atomic
from ..switching.adaptive import AdaptiveSwitcher, ExpertMaster
from ..switching.slotset import packed_fingerprint, save_slot_set
from ..tokens import bos_id_as_trained
from .common import domain_windows

NOVEL = embedded_split().novel
TARGETS = {"ppl_and_kl_relative_difference": 1e-4, "forward_with_slots_over_without": 1.10,
           "switch_from_saved_set_ms": 10.0}


def evaluate(model, windows: torch.Tensor, reference: ReferenceLogprobs, key: str) -> dict:
    callback, fid = reference.comparer(key, windows)
    result = token_perplexity(model, windows, batch_size=4, on_logprobs=callback)
    return {"ppl": result.ppl, "kl": float(np.mean(fid.kl))}


def forward_seconds(model, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed-qwen-moe", help="an embedded model (assets/models/<name>)")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--switch-windows", type=int, default=4)
    parser.add_argument("--test-windows", type=int, default=4)
    parser.add_argument("--domains", nargs="+", default=NOVEL)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    model_dir = REPO_ROOT / "assets" / "models" / args.model
    if not (model_dir / "config.json").is_file():
        parser.error(f"--model {args.model}: no embedded model at {model_dir.relative_to(REPO_ROOT)}")
    out = args.out or REPO_ROOT / "results" / "benchmarks" / f"packed_slots_{args.model}.json"
    started = time.perf_counter()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bos_id = bos_id_as_trained(ModelConfig(name=args.model, path=str(model_dir)), tokenizer)
    data = {d: {"switch": domain_windows(tokenizer, SourceConfig(path=d), "calib", args.seqlen, args.switch_windows,
                                         bos_id),
                "test": domain_windows(tokenizer, SourceConfig(path=d), "test", args.seqlen, args.test_windows, bos_id)}
            for d in args.domains}

    with ReferenceLogprobs() as reference, tempfile.TemporaryDirectory() as tmp:
        vocab = model.get_output_embeddings().out_features
        for d in args.domains:
            token_perplexity(model, data[d]["test"], batch_size=4,
                             on_logprobs=reference.recorder(d, data[d]["test"], vocab))
        master = ExpertMaster(model)
        plan = QuantPlan(method="rtn", default=QSpec(args.bits, group_size=128), model={"name": args.model})
        codes = apply_plan(model, plan, keep_codes=True).codes
        write_dequantized(model, pack_experts(model, codes))
        dense = copy.deepcopy(model)
        attach_packed(model, pack_experts(model, codes))
        dense_sw = AdaptiveSwitcher(dense, plan, master)
        packed_sw = AdaptiveSwitcher(model, plan, master)
        fingerprint = packed_fingerprint(model)
        folder = Path(tmp) / "slot_sets"
        rows = {}
        for d in args.domains:
            switch = dense_sw.switch_to(data[d]["switch"])
            save_slot_set(folder, d, dense_sw.slots, fingerprint, {**dense_sw.summary(), "dataset": d})
            packed_sw.switch_to_set(dense_sw.slots, d)
            fake, packed = (evaluate(m, data[d]["test"], reference, d) for m in (dense, model))
            ids = data[d]["test"][:1]
            with_slots, without = [], []
            for _ in range(args.repeats):  # interleaved: the machine's drift hits both alike
                packed_sw.switch_to_set(dense_sw.slots, d)
                with_slots.append(forward_seconds(model, ids))
                packed_sw.restore_bq()
                without.append(forward_seconds(model, ids))
            rows[d] = {"slots": switch.slots, "slot_nbytes": switch.extra_nbytes, "budget_nbytes": switch.budget_nbytes,
                       "switch_from_windows_s": {k: round(getattr(switch, k), 4) for k in
                                                 ("profile_s", "select_s", "write_s", "total_s")},
                       "fake_quantized": fake, "packed": packed,
                       "ppl_relative_difference": abs(packed["ppl"] / fake["ppl"] - 1),
                       "kl_relative_difference": abs(packed["kl"] / fake["kl"] - 1),
                       "forward_s": {"with_slots": statistics.median(with_slots),
                                     "without": statistics.median(without)},
                       "forward_with_slots_over_without": statistics.median(with_slots) / statistics.median(without)}
            print(f"{d:>6}: PPL {fake['ppl']:.4f} / {packed['ppl']:.4f}  KL {fake['kl']:.6f} / {packed['kl']:.6f}  "
                  f"forward x{rows[d]['forward_with_slots_over_without']:.3f}", flush=True)
        reopened = AdaptiveSwitcher.for_saved_sets(model, folder)
        by_name = []
        for _ in range(args.repeats):
            for d in args.domains:
                by_name.append(reopened.switch_to_saved(d).total_s)
        reopened.restore_bq()

    worst = {"ppl_relative_difference": max(r["ppl_relative_difference"] for r in rows.values()),
             "kl_relative_difference": max(r["kl_relative_difference"] for r in rows.values()),
             "forward_with_slots_over_without": max(r["forward_with_slots_over_without"] for r in rows.values()),
             "switch_from_saved_set_ms": 1e3 * statistics.median(by_name)}
    result = {"script": "scripts/bench_packed_slots.py",
              "command": "OMP_NUM_THREADS=2 python scripts/bench_packed_slots.py "
                         + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": args.model, "bq": f"RTN-{args.bits}, group 128, packed (the fake-quantized twin holds the "
                                         f"packed values)",
              "switch": dense_sw.summary(), "domains": rows, "worst": worst, "targets": TARGETS,
              "switch_from_saved_set_s": by_name, "threads": torch.get_num_threads(),
              "backend": "torch (CPU reference path)", "wall_s": round(time.perf_counter() - started, 1),
              "device": device_info(torch.device("cpu")), "versions": package_versions()}
    write_json_atomic(out, result)
    print(f"worst: {worst} -> {out}")
