"""DynaMo's online switch (DQS) on the embedded model: latency, bytes moved, cache size.

    OMP_NUM_THREADS=1 python scripts/bench_switching.py [--model testbed-qwen-moe] [--repeats 3] [--modes requant fp16]

Known datasets code, docs, speeches, literature (calib split, --windows x --seqlen tokens each)
give the significance; the FP16 channel cache keeps 1% of each expert's channels; BQ is RTN
with DynaMo's budget allocation (3.0 bits, widths 8/6/4/3/2), applied with GPTQ (the harness's
default, calibrated on the known domains' windows) or with --quantizer rtn. Then,
from the BQ state, `switch_to` is timed on --switch-windows windows of each novel domain
(email, legal, math, chat; calib split), split into profile / allocate / requant, next to a
full re-quantization of the whole model from FP16 with the same quantizer and plan (for GPTQ:
its calibration pass included, as a re-quantization must redo it), measured in the same run.
The paper's switch (--modes, --mix) and the adaptive policy (the default; --budget-frac) are
timed alike; the adaptive switch is split into profile (routed capture with Hessians) / select /
write. Medians over --repeats. Token PPL on --ppl-windows test
windows of each novel domain: FP16, BQ, and BQ + the switch (the same windows for all three).
Windows open with BOS where the model was trained so (its training.json).
The adaptive switch also reports per domain the bytes it held at once (one MoE layer's Hessians and
candidates, `held_nbytes_peak`) and (select + write) / profile. Then, from the adaptive sets just
computed: a switch from a saved set (`saved_set`: each domain's set written with save_slot_set, then
load_slot_set + switch_to_set timed, whole model) and the packed model (`packed`: the same BQ packed
with attach_packed, a saved set switched into its slot tables, and its forward with the slot table
full against without, same windows, CPU path). `--modes` with no value skips the paper policy.
Writes results/benchmarks/switching_<model>.json (`_rtn` added with --quantizer rtn).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..adapters import moe_layers
from ..analysis import Significance
from ..calibration import capture
from ..calibration.stage import calibration_windows
from ..config import REPO_ROOT, AllocationConfig, AnalysisConfig, ModelConfig, SourceConfig
from ..data import embedded_split
from ..eval.perplexity import token_perplexity
from ..quant import QSpec, QuantPlan, apply_plan, bit_accounting, quantize_sequential
from ..quant.allocation import allocate
from ..records import device_info, package_versions, write_json_atomic
from ..switching import ChannelCache, DynamicSwitcher
from ..switching.adaptive import AdaptiveSwitcher, ExpertMaster
from ..tokens import RunTokens, bos_id_as_trained
from .common import domain_windows
from .switching import (ADAPTIVE_PARTS, ADAPTIVE_TARGETS, PARTS, TARGETS, packed_with_slots, repeated_switch,
                        saved_set_switch, timed)

KNOWN, NOVEL = embedded_split()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="testbed-qwen-moe", help="an embedded model (assets/models/<name>)")
    parser.add_argument("--windows", type=int, default=8, help="analysis windows per known dataset")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--switch-windows", type=int, default=4, help="windows of the new domain that switch_to profiles")
    parser.add_argument("--ppl-windows", type=int, default=4, help="test windows per novel domain (0: no PPL)")
    parser.add_argument("--frac", type=float, default=0.01, help="dynamic_channel_frac")
    parser.add_argument("--mix", type=float, default=0.5)
    parser.add_argument("--budget-frac", type=float, default=0.01, help="adaptive policy: slot bytes / FP16 expert bytes")
    parser.add_argument("--modes", nargs="*", default=["requant", "fp16"], choices=["requant", "fp16"],
                        help="the paper policy's modes (none: adaptive only)")
    parser.add_argument("--forward-windows", type=int, default=4, help="windows of the packed forward timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantizer", choices=["gptq", "rtn"], default="gptq",
                        help="BQ's quantizer, and the full re-quantization's (GPTQ's is timed once: it is slow)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/benchmarks/switching_<model>[_rtn].json")
    args = parser.parse_args(argv)
    model_dir = REPO_ROOT / "assets" / "models" / args.model
    if not (model_dir / "config.json").is_file():
        parser.error(f"--model {args.model}: no embedded model at {model_dir.relative_to(REPO_ROOT)}")
    suffix = "_rtn" if args.quantizer == "rtn" else ""
    out = args.out or REPO_ROOT / "results" / "benchmarks" / f"switching_{args.model}{suffix}.json"
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    started = time.perf_counter()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    fp16_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bos_id = bos_id_as_trained(ModelConfig(name=args.model, path=str(model_dir)), tokenizer)
    sources = {name: SourceConfig(path=name) for name in KNOWN + NOVEL}
    analysis = OmegaConf.merge(OmegaConf.structured(AnalysisConfig), {"windows": args.windows, "seqlen": args.seqlen})
    switch_cfg = OmegaConf.merge(analysis, {"windows": args.switch_windows})
    allocation = OmegaConf.merge(OmegaConf.structured(AllocationConfig),
                                 {"method": "budget", "target_bits": 3.0, "widths": [8, 6, 4, 3, 2], "fuse": "mean"})

    # offline: significance, cache and BQ, all from the FP16 model
    layers = list(moe_layers(fp16_model))
    tokens = RunTokens(tokenizer, sources, bos_id)
    known_windows = calibration_windows(tokens, KNOWN, analysis)
    captures, analysis_s = timed(lambda: {n: capture(fp16_model, w, batch_size=analysis.batch_size, hessians=False)
                                          for n, w in known_windows.items()})
    sig = Significance.from_captures(captures, layers, "act_l2", "row")
    plan = QuantPlan(method=args.quantizer, default=QSpec(3, group_size=128), model={"name": args.model})
    calib = torch.cat(list(known_windows.values()))

    def quantize(model):
        # the codes are kept (references to what the quantizer makes anyway) for the packed model below
        if args.quantizer == "rtn":
            return apply_plan(model, plan, keep_codes=True)
        else:
            return quantize_sequential(model, plan, calib, batch_size=analysis.batch_size, keep_codes=True)[0]

    allocate(plan, layers, allocation, significance=sig)
    cache, cache_s = timed(lambda: ChannelCache.build(fp16_model, sig, args.frac, widths=list(allocation.widths),
                                                      group_size=128, sym=False))
    novel = calibration_windows(tokens, NOVEL, switch_cfg)
    ppl_windows = {d: domain_windows(tokenizer, sources[d], "test", args.seqlen, args.ppl_windows, bos_id)
                   for d in NOVEL} if args.ppl_windows else {}
    ppl = lambda model, d: token_perplexity(model, ppl_windows[d], batch_size=8).ppl  # noqa: E731
    ppl_fp16 = {d: ppl(fp16_model, d) for d in ppl_windows}

    # the yardstick: a full re-quantization of every expert from FP16, same quantizer and plan
    full = []
    for _ in range(args.repeats if args.quantizer == "rtn" else 1):
        bq_model = copy.deepcopy(fp16_model)   # copying is not part of re-quantizing
        t = time.perf_counter()
        bq_report = quantize(bq_model)
        full.append(time.perf_counter() - t)
    full_s = statistics.median(full)
    bq_bits = bit_accounting(bq_model, plan.spec_for)

    expert_bytes = cache.expert_weight_count * 2
    result = {
        "benchmark": "switching",
        "command": "python scripts/bench_switching.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str(model_dir.relative_to(REPO_ROOT)), "bos_windows": bos_id is not None, "dtype": "float32",
        "known": KNOWN, "novel": NOVEL,
        "analysis": {"windows": args.windows, "seqlen": args.seqlen, "split": "calib", "metric": "act_l2",
                     "unit": "row", "capture_s": round(analysis_s, 3)},
        "switch_sample": {"windows": args.switch_windows, "seqlen": args.seqlen, "split": "calib"},
        "allocation": {"method": "budget", "target_bits": 3.0, "widths": list(allocation.widths), "fuse": "mean",
                       "quantizer": args.quantizer, "group_size": 128, "sym": False},
        "mix": args.mix, "repeats": args.repeats,
        "cache": {**cache.summary(), "build_s": round(cache_s, 3), "expert_weight_bytes_fp16": expert_bytes,
                  "cache_over_expert_bytes": cache.nbytes / expert_bytes,
                  "within_target": cache.nbytes / expert_bytes <= TARGETS["cache_over_expert_bytes"]},
        "full_requant_s": full_s, "full_requant_s_each": full,
        "bq_bits": {k: bq_bits[k] for k in ("experts", "experts_codes_only", "all")},
        "targets": TARGETS, "modes": {},
    }

    for mode in args.modes:
        model = copy.deepcopy(bq_model)
        t = time.perf_counter()
        switcher = DynamicSwitcher(model, plan, sig, cache, allocation, channel_mode=mode, mix=args.mix)
        setup_s = time.perf_counter() - t
        ppl_bq = {d: ppl(model, d) for d in ppl_windows}
        domains = {}
        for d, w in novel.items():
            last, med = repeated_switch(switcher, w, args.repeats, PARTS)
            domains[d] = {
                **{p: round(v, 5) for p, v in med.items()},
                "switch_over_full_requant": med["total_s"] / full_s,
                "requant_only_over_full_requant": med["requant_s"] / full_s,
                "experts_changed": last.experts_changed, "slices_rewritten": last.slices_rewritten,
                "bytes_read": last.bytes_read, "bytes_written": last.bytes_written, "bytes_moved": last.bytes_moved,
                "expert_bits": last.expert_bits, "exact_bits": last.exact_bits,
                "ppl": ({"fp16": ppl_fp16[d], "bq": ppl_bq[d], "bq_dqs": ppl(model, d)} if ppl_windows else None),
            }
            print(f"{mode:>7} {d:>6}: switch {med['total_s'] * 1e3:7.1f} ms (profile {med['profile_s'] * 1e3:6.1f}, "
                  f"allocate {med['allocate_s'] * 1e3:5.1f}, requant {med['requant_s'] * 1e3:5.1f}) = "
                  f"{domains[d]['switch_over_full_requant']:.2f} x full requant; {last.experts_changed} experts, "
                  f"{last.bytes_moved} B moved")
        totals = [v["total_s"] for v in domains.values()]
        result["modes"][mode] = {
            "setup_s": round(setup_s, 4), "bq_copy_nbytes": switcher.bq_copy_nbytes, "domains": domains,
            "median_switch_s": statistics.median(totals),
            "median_switch_over_full_requant": statistics.median(totals) / full_s,
            "within_target": statistics.median(totals) / full_s <= TARGETS["switch_over_full_requant"]}
    # the adaptive policy (the default): slots chosen per domain from the FP16 master copy
    model = copy.deepcopy(bq_model)
    adaptive = AdaptiveSwitcher(model, plan, ExpertMaster(fp16_model), budget_frac=args.budget_frac)
    ppl_bq = {d: ppl(model, d) for d in ppl_windows}
    domains, sets = {}, {}
    for d, w in novel.items():
        last, med = repeated_switch(adaptive, w, args.repeats, ADAPTIVE_PARTS)
        domains[d] = {**{p: round(v, 5) for p, v in med.items()},
                      "switch_over_full_requant": med["total_s"] / full_s,
                      "select_write_over_profile": (med["select_s"] + med["write_s"]) / med["profile_s"],
                      "held_nbytes_peak": last.held_nbytes_peak, "held_nbytes_by_layer": last.held_nbytes_by_layer,
                      "slots": last.slots, "extra_nbytes": last.extra_nbytes, "weights_rewritten": last.weights_rewritten,
                      "exact_bits": last.exact_bits,
                      "ppl": ({"fp16": ppl_fp16[d], "bq": ppl_bq[d], "bq_dqs": ppl(model, d)} if ppl_windows else None)}
        sets[d] = adaptive.slots.to("cpu")
        print(f"adaptive {d:>6}: switch {med['total_s'] * 1e3:7.1f} ms (profile {med['profile_s'] * 1e3:6.1f}, "
              f"select {med['select_s'] * 1e3:6.1f}, write {med['write_s'] * 1e3:5.1f}) = "
              f"{domains[d]['switch_over_full_requant']:.2f} x full requant; {last.extra_nbytes} slot bytes")
    totals = [v["total_s"] for v in domains.values()]
    result["adaptive"] = {
        "budget_frac": args.budget_frac, "budget_nbytes": adaptive.budget_nbytes, "candidates": adaptive.candidates,
        "scoring": adaptive.scoring, "master_nbytes_host": adaptive.master.nbytes, "domains": domains,
        "median_switch_s": statistics.median(totals),
        "median_switch_over_full_requant": statistics.median(totals) / full_s,
        "median_select_write_over_profile": statistics.median(v["select_write_over_profile"] for v in domains.values()),
        "held_nbytes_peak": max(v["held_nbytes_peak"] for v in domains.values()),
        "targets": ADAPTIVE_TARGETS,
        "within_target": statistics.median(totals) / full_s <= ADAPTIVE_TARGETS["switch_over_full_requant"]}
    with tempfile.TemporaryDirectory() as folder:
        saved, names = saved_set_switch(adaptive, sets, Path(folder), args.model, args.repeats)
        result["saved_set"] = saved
        fwd = torch.cat([ppl_windows[d][:1] for d in ppl_windows]) if ppl_windows else torch.cat(
            [w[:1] for w in novel.values()])
        result["packed"] = packed_with_slots(bq_model, plan, bq_report, ExpertMaster(fp16_model), adaptive.budget_frac,
                                             Path(folder), names, fwd[:args.forward_windows], args.repeats)
    result.update(wall_s=round(time.perf_counter() - started, 1), threads=torch.get_num_threads(),
                  device=device_info(torch.device("cpu")), versions=package_versions())
    write_json_atomic(out, result)
    print(f"cache {cache.nbytes} B = {result['cache']['cache_over_expert_bytes']:.4%} of FP16 expert weights; "
          f"full {args.quantizer} requant {full_s * 1e3:.1f} ms; wall {result['wall_s']} s -> {out}")
