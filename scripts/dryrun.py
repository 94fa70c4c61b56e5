"""Real-shape dry run on CPU: a paper model's published config, random weights, its first layers,
through the whole pipeline; measurements and an extrapolation to the full model.

    OMP_NUM_THREADS=2 python scripts/dryrun.py --model qwen-moe [--moe-layers 2]
    python scripts/dryrun.py --model deepseek-moe --shrink    # seconds: the same path at toy widths

Steps (each run.py call is a fresh process, timed by /usr/bin/time for its peak RSS):
  1. build the truncated model (assets/configs/<model>.json; dynamo/dryrun/build.py), bf16, real
     vocabulary, saved with the embedded tokenizer (8192 tokens, all below every real vocab size);
  2. `run.py model=local experiment=dryrun`: FP16 reference, analysis on two datasets, BQ with GPTQ
     layer by layer, a DQS switch per dataset, the packed export;
  3. `run.py model=local model.path=<packed_model> quant=fp16` in a fresh process: reload and evaluate;
  4. GPTQ's per-matrix seconds at the real shapes, and this CPU's matmul throughput;
  5. extrapolation (dynamo/dryrun/extrapolate.py) -> results/benchmarks/dryrun_<model>.json.
DeepSeek-MoE has no transformers class: its stand-in (dynamo/dryrun/deepseek_standin.py) is saved
the way the hub checkpoint ships, as remote code (the module beside the weights, `auto_map` in
config.json), and run.py loads it with model.trust_remote_code=true, as conf/model/deepseek-moe.yaml
does. Its experts are a ModuleList, which the packed export refuses: step 2 runs once with the
export to record that one-line refusal (before any work), then with quant.export=none; step 3 is
skipped ("reload": null), and the packed checkpoint's disk comes from the plan's bits per routed
weight (the accounting the export checks itself against) instead of a measured checkpoint.
`--shrink` runs any model at toy widths (dynamo/dryrun/build.py SHRINK) to check this path in
seconds; its JSON is not a measurement of the model (it goes under --work, not results/).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dynamo.adapters import moe_layers  # noqa: E402
from dynamo.dryrun import build_model, load_real_config, param_bytes  # noqa: E402
from dynamo.dryrun.build import REMOTE_CODE, dense_prefix, shrink_overrides  # noqa: E402
from dynamo.dryrun.extrapolate import (GIB, dqs_device_nbytes, matmul_gflops, memory_model,  # noqa: E402
                                       switch_held_nbytes, switch_needs)
from dynamo.dryrun.rss import RssSampler, loaded_at, stage_peaks  # noqa: E402
from dynamo.quant import QSpec, quantize_gptq  # noqa: E402
from dynamo.records import device_info, package_versions, write_json_atomic  # noqa: E402

TOKENIZER = REPO / "assets" / "tokenizer"
EVAL = ["dataset.known=[code,docs]", "eval.datasets=[code,docs]", "eval.seqlen=128", "eval.max_windows=2",
        "eval.batch_size=2", "eval.lm_eval.enabled=false", "logger=none"]
# The full run the extrapolation is for: the users' main command in docs/method.md (dataset=embedded, 4 known
# datasets) with the schema defaults, 32 windows x 512 tokens per dataset for analysis and calibration.
FULL_TOKENS = {"analysis": 4 * 32 * 512, "calib": 4 * 32 * 512, "switch": 4 * 512}
DRY_TOKENS = {"analysis": 2 * 2 * 128, "calib": 2 * 2 * 128, "switch": 2 * 128}
# GPU fp32 peak TFLOPS (datasheets: A100 19.5, H100 SXM 67) at an assumed 30% efficiency: the
# pipeline's per-expert products are small (routed tokens x expert width) and GPTQ's column loop is
# launch-bound, so a GPU reaches a fraction of peak; the CPU side is measured matmul throughput.
GPU_FP32_TFLOPS = {"A100": 19.5, "H100": 67.0}
GPU_EFFICIENCY = 0.30


def timed(cmd: list[str], log: Path, record: Path) -> dict:
    """Run cmd (run.py, writing `record`) in a fresh process: its wall seconds, its peak RSS (GNU time)
    and the peak RSS of each pipeline stage (sampled, dynamo/dryrun/rss.py)."""
    stats = log.with_suffix(".time")
    t = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", str(stats), *cmd], stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO)
        sampler = RssSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        samples = sampler.stop()
    wall = time.perf_counter() - t
    if rc != 0:
        sys.exit(f"error: {' '.join(cmd[:3])} ... failed (exit {rc}); see {log}")
    out = {"wall_s": round(wall, 2), "peak_rss_gib": round(int(stats.read_text().split()[-1]) * 1024 / GIB, 3)}
    anchor = loaded_at(log.read_text(errors="replace"))
    if anchor is not None and samples:
        peaks = stage_peaks(samples, anchor, json.loads(record.read_text())["timings"])
        out["peak_rss_gib_by_stage"] = {stage: round(b / GIB, 3) for stage, b in peaks.items()}
        out["rss_sample_interval_s"] = sampler.interval
    return out


def refusal(cmd: list[str], log: Path) -> str:
    """Run cmd, which must stop with run.py's bad-input exit (2) and one `error:` line; that line."""
    with log.open("w") as out:
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    errors = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    if rc != 2 or len(errors) != 1:
        sys.exit(f"error: expected the packed export to refuse ModuleList experts (exit 2, one error line), got "
                 f"exit {rc}; see {log}. If the export now supports them, drop the remote-code special case here")
    return errors[0]


def gptq_seconds(model, bits: int = 4) -> dict:
    """Median-free single timing of GPTQ on one routed expert's matrices at the real shapes."""
    layer = next(iter(moe_layers(model)))
    spec, gen, out = QSpec(bits, group_size=128), torch.Generator().manual_seed(0), {}
    for projection in ("gate", "up", "down"):
        w = layer.weight(0, projection).float()
        x = torch.randn(2 * w.shape[1], w.shape[1], generator=gen)
        h = x.T @ x
        quantize_gptq(w[:8], h, spec)  # warm-up (allocations)
        t = time.perf_counter()
        quantize_gptq(w, h, spec)
        out[projection] = round(time.perf_counter() - t, 3)
    return out


def switch_summary(switching: dict, n_moe: int, stage_rss: dict | None) -> dict | None:
    """The adaptive switches of a dry run's record: each one's seconds per part and the bytes it held (one MoE
    layer's statistics and candidates at a time), per MoE layer; its peak RSS is the evaluation stage's
    ("eval_ppl": the switch per dataset, then that dataset's few windows)."""
    switches = switching.get("switches") or {}
    if switching.get("policy") != "adaptive" or not switches:
        return None
    each = {}
    for name, r in switches.items():
        each[name] = {"profile_s": round(r["profile_s"], 3), "select_s": round(r["select_s"], 3),
                      "write_s": round(r["write_s"], 3), "total_s": round(r["total_s"], 3),
                      "select_write_over_profile": round((r["select_s"] + r["write_s"]) / r["profile_s"], 3)
                      if r["profile_s"] > 0 else None,
                      "held_nbytes_peak": r.get("held_nbytes_peak"),
                      "held_nbytes_by_layer": r.get("held_nbytes_by_layer")}
    mean = lambda key: sum(v[key] for v in each.values()) / len(each)  # noqa: E731
    return {"switches": each, "held_nbytes_peak": max(v["held_nbytes_peak"] or 0 for v in each.values()),
            "master_location": switching.get("master_location"), "master_nbytes": switching.get("master_nbytes"),
            "budget_nbytes": switching.get("budget_nbytes"),
            "per_moe_layer_s": {p: round(mean(p) / n_moe, 4) for p in ("profile_s", "select_s", "write_s")},
            "peak_rss_gib": (stage_rss or {}).get("eval_ppl"),
            "peak_rss_gib_before": (stage_rss or {}).get("eval_ppl_bq"),
            "rss_note": "peak_rss_gib: the 'eval_ppl' stage (each dataset's switch, then its windows); "
                        "peak_rss_gib_before: the BQ evaluation just before it (no switch)"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--moe-layers", type=int, default=2, help="MoE layers kept (after any dense prefix)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="float32",
                   help="CPU has no fast bf16 matmul: float32 by default (memory accounting stays at bf16)")
    p.add_argument("--device", default="cpu", help="model.device of the pipeline runs (cuda: the record gains the "
                   "peak GPU memory)")
    p.add_argument("--offload", action="store_true", help="model.offload=true: decoder layers on the CPU, one at a "
                   "time on --device (dynamo/offload.py); the JSON records what was resident")
    p.add_argument("--work", type=Path, default=Path("/tmp/dynamo-dryrun"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra run.py override for the pipeline run (repeatable), e.g. quant.method=rtn where "
                        "GPTQ's seconds are not the point (scripts/dryrun_depth.py); recorded in the JSON")
    p.add_argument("--no-export", action="store_true",
                   help="quant.export=none and no reload (the switch's memory and seconds are the point)")
    p.add_argument("--shrink", action="store_true",
                   help="toy widths (dynamo/dryrun/build.py SHRINK), same layout: checks the path in seconds; the "
                        "JSON (default under --work) is not a measurement of the model")
    args = p.parse_args()
    values = load_real_config(args.model)
    shrink = shrink_overrides(values) if args.shrink else None
    dry_values = {**values, **(shrink or {})}
    out_path = args.out or (args.work / f"dryrun_{args.model}-shrunk.json" if shrink else
                            REPO / "results" / "benchmarks" / f"dryrun_{args.model}.json")
    layers = dense_prefix(values) + args.moe_layers
    remote = values["model_type"] in REMOTE_CODE  # the stand-in: remote code, ModuleList experts
    work = args.work / args.model
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    t = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    model = build_model(args.model, layers, overrides=shrink, dtype=dtype)
    build_s = time.perf_counter() - t
    dry_params = param_bytes(model)
    gptq = gptq_seconds(model)
    from transformers import AutoTokenizer

    if remote:
        from dynamo.dryrun.deepseek_standin import save_remote_code

        save_remote_code(model, work / "model")
    else:
        model.save_pretrained(work / "model")
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(work / "model")
    del model

    py = [sys.executable, "run.py", "model=local", f"model.path={work / 'model'}", f"model.name={args.model}",
          f"model.dtype={args.dtype}", f"model.device={args.device}", f"model.offload={str(args.offload).lower()}",
          *(["model.trust_remote_code=true"] if remote else []), "experiment=dryrun"]
    refused = None
    if remote and not args.no_export:  # the export refuses before any work (dynamo/export/packed.py check)
        refused = refusal([*py, f"hydra.run.dir={work / 'refused'}"], work / "refused.log")
    if remote or args.no_export:
        py.append("quant.export=none")
    py += args.overrides
    runs = {"pipeline": timed([*py, f"hydra.run.dir={work / 'run'}"], work / "run.log", work / "run" / "result.json")}
    record = json.loads((work / "run" / "result.json").read_text())
    reload = None
    if not remote and not args.no_export:
        packed = work / "run" / "packed_model"
        runs["reload_packed"] = timed([sys.executable, "run.py", "model=local", f"model.path={packed}",
                                       f"model.name={args.model}-packed", f"model.dtype={args.dtype}",
                                       f"model.device={args.device}", "quant=fp16", *EVAL,
                                       f"hydra.run.dir={work / 'reload'}"], work / "reload.log",
                                      work / "reload" / "result.json")
        reload = json.loads((work / "reload" / "result.json").read_text())

    full = build_model(args.model, None, device="meta")
    full_params = param_bytes(full)
    meta_dry = build_model(args.model, layers, overrides=shrink, device="meta")
    hidden = values["hidden_size"]
    n_dry, n_full = len(list(moe_layers(meta_dry))), len(list(moe_layers(full)))
    sw = record["switching"]
    dqs_dry = dqs_device_nbytes(sw)
    mem_dry = memory_model(meta_dry, calib_tokens=DRY_TOKENS["calib"], hidden=dry_values["hidden_size"],
                           dqs_cache=dqs_dry, bytes_per_param=dtype.itemsize)
    mem_full = memory_model(full, calib_tokens=FULL_TOKENS["calib"], hidden=hidden,
                            dqs_cache=round(dqs_dry * n_full / n_dry))

    # disk: everything but the routed experts at bf16, the routed experts as packed per layer: measured
    # in the exported checkpoint, or (no export: ModuleList experts) the plan's bits per routed weight
    if "export" in record:
        width = dtype.itemsize  # the checkpoint keeps non-routed weights at the run's dtype; the full model's at bf16
        routed_dry = record["export"]["checkpoint_nbytes"] - width * (dry_params["params"]
                                                                      - dry_params["routed_expert_params"])
        disk_basis = "measured: the packed checkpoint's bytes less its non-routed weights"
    else:
        bits = record["quantization"]["bits"]
        routed_dry = bits["experts"] * bits["expert_params"] / 8
        disk_basis = (f"accounting: {bits['experts']:.3f} bits per routed weight (codes, scales, zeros; the plan's "
                      "avg bits), no packed export of ModuleList experts")
    routed_per_layer = routed_dry / n_dry
    disk_full = 2 * (full_params["params"] - full_params["routed_expert_params"]) + routed_per_layer * n_full

    # hours: capture-like stages scale with tokens and layers, GPTQ's solves with matrices
    tm = record["timings"]
    experts = next(iter(moe_layers(meta_dry))).n_experts
    solve_layer = experts * sum(gptq.values())
    gptq_matrices_dry = record["quantization"]["matrices"]
    solve_dry = min(tm["quantize_s"], gptq_matrices_dry / 3 * sum(gptq.values()))
    per_layer = {"analysis_s": tm["analysis_s"] / n_dry,
                 "quantize_capture_s": (tm["quantize_s"] - solve_dry) / n_dry,
                 "gptq_solve_s_full_tokens": solve_layer,
                 "dqs_prepare_s": sw["prepare_s"] / n_dry}
    cpu_s = n_full * (per_layer["analysis_s"] * FULL_TOKENS["analysis"] / DRY_TOKENS["analysis"]
                      + per_layer["quantize_capture_s"] * FULL_TOKENS["calib"] / DRY_TOKENS["calib"]
                      + solve_layer + per_layer["dqs_prepare_s"])
    switch = switch_summary(sw, n_dry, runs["pipeline"].get("peak_rss_gib_by_stage"))
    if switch is not None:  # one switch of the full model: per-layer seconds x MoE layers, one layer's held bytes
        switch["accounting_nbytes"] = switch_held_nbytes(meta_dry, sw["budget_nbytes"])
        switch["full"] = switch_needs(switch["per_moe_layer_s"], switch["held_nbytes_peak"], moe_layers_full=n_full,
                                      weights=full_params["bytes"], budget=round(sw["budget_nbytes"] * n_full / n_dry),
                                      activations=2 * FULL_TOKENS["switch"] * hidden * 2,
                                      token_scale=FULL_TOKENS["switch"] / DRY_TOKENS["switch"])
        switch["full"]["token_basis"] = DRY_TOKENS["switch"]
        switch["full"]["basis"] = ("this CPU at the run's threads; profile scaled to the full run's switch sample "
                                   f"({FULL_TOKENS['switch']} tokens against {DRY_TOKENS['switch']}); peak: bf16 "
                                   "weights + slot budget + one MoE layer's held bytes (measured here)")
    gflops = matmul_gflops()
    ratio = {gpu: tf * 1e3 * GPU_EFFICIENCY / gflops for gpu, tf in GPU_FP32_TFLOPS.items()}
    if reload is None:
        reloaded = {"reload": None, "reload_skipped": (
            "--no-export: quant.export=none" if args.no_export else
            "no packed checkpoint to reload: the packed export refuses ModuleList experts (pipeline.export.refused)")}
    else:
        ppl = reload["metrics"]["ppl"]
        reloaded = {"reload": {"ppl": ppl, "timings": reload["timings"], "ppl_matches_bq": {
            d: abs(ppl[d] / record["metrics"]["ppl_bq"][d] - 1) < 1e-2 for d in ppl}}}
    out = {
        "benchmark": "dryrun", "model": args.model, "source": json.loads(
            (REPO / "assets" / "configs" / f"{args.model}.json").read_text())["_source"],
        "command": f"OMP_NUM_THREADS={torch.get_num_threads()} python scripts/dryrun.py --model {args.model} "
                   f"--moe-layers {args.moe_layers} --dtype {args.dtype} --device {args.device}"
                   + (" --offload" if args.offload else "") + (" --no-export" if args.no_export else "")
                   + "".join(f" --set {o}" for o in args.overrides) + (" --shrink" if shrink else ""),
        "overrides": args.overrides,
        "truncated": {"layers": layers, "moe_layers": n_dry, "vocab_size": dry_values["vocab_size"],
                      "shrunk": shrink and {"overrides": shrink, "note": "a path check at toy widths: the per-layer "
                                            "measurements are not the model's, nor is the extrapolation"},
                      "dtype": args.dtype, "build_s": round(build_s, 2), **dry_params},
        "full": {"layers": values["num_hidden_layers"], "moe_layers": n_full, **full_params},
        "runs": runs,
        "offload": record["model"].get("offload"),  # bytes resident on the execution device, transfers
        "peak_gpu_memory_bytes": record["model"].get("peak_gpu_memory_bytes"),
        "weights_nbytes_run_dtype": dry_params["params"] * dtype.itemsize,
        "routed_expert_nbytes_run_dtype": dry_params["routed_expert_params"] * dtype.itemsize,
        "pipeline": {"timings": tm, "ppl_fp16": record["metrics"]["ppl_fp16"], "ppl_bq": record["metrics"]["ppl_bq"],
                     "ppl_dqs": record["metrics"]["ppl"], "avg_bits": record["metrics"]["avg_bits"],
                     "gptq_matrices": gptq_matrices_dry, "rtn_fallback": len(record["quantization"]["rtn_fallback"]),
                     "switches": sw["switches"], "export": record.get("export", {"format": "packed",
                                                                                  "refused": refused})},
        **reloaded,
        "switch": switch,
        "per_moe_layer": {**{k: round(v, 3) for k, v in per_layer.items()},
                          "gptq_s_per_matrix": gptq,
                          "stats": mem_full.layer_stats, "stats_gib": round(mem_full.layer_stats / GIB, 3),
                          "weights_gib": round(mem_full.one_layer_weights / GIB, 3),
                          "packed_routed_gib": round(routed_per_layer / GIB, 3)},
        "accounting_check": {"predicted_sequential_gib": round(mem_dry.sequential() / GIB, 2),
                             "measured_peak_rss_gib": runs["pipeline"]["peak_rss_gib"],
                             "note": "the prediction is what a GPU run holds on the GPU; CPU RSS also holds what such a "
                                     "run keeps in host memory (the adaptive DQS's FP16 master copy of the experts), "
                                     "loading's transient peak of about twice the weights (part of it the checkpoint's "
                                     "memory-mapped pages), the interpreter and torch (~0.45 GiB) and evaluation "
                                     "temporaries; "
                                     "runs.pipeline.peak_rss_gib_by_stage shows where it grows",
                             **({"offload_resident_layer_bytes": {
                                 "measured": record["model"]["offload"]["peak_resident_layer_bytes"],
                                 "predicted": mem_dry.one_layer_weights}} if args.offload else {})},
        "extrapolation": {
            "gpu_memory": mem_full.to_dict(),
            "packed_checkpoint_gib": round(disk_full / GIB, 2), "packed_checkpoint_basis": disk_basis,
            "bf16_checkpoint_gib": round(full_params["bytes"] / GIB, 2),
            "offline_cpu_hours": round(cpu_s / 3600, 2),
            "cpu_matmul_gflops": round(gflops, 1),
            "cpu_to_gpu_ratio": {g: round(r, 1) for g, r in ratio.items()},
            "ratio_basis": f"GPU fp32 peak {GPU_FP32_TFLOPS} TFLOPS x {GPU_EFFICIENCY} efficiency / measured CPU matmul "
                           "GFLOPS; not measured on a GPU (none available)",
            "offline_gpu_hours": {g: round(cpu_s / r / 3600, 2) for g, r in ratio.items()},
            "tokens": {"full": FULL_TOKENS, "dry": DRY_TOKENS},
            "scope": "offline stage (analysis + calibration capture + GPTQ + DQS cache) of the README's main "
                     "command; evaluation excluded (it depends on the test split's size)"},
        "device": device_info(torch.device("cpu")), "versions": package_versions(),
    }
    write_json_atomic(out_path, out)
    e = out["extrapolation"]
    print(f"{args.model}: peak RSS {runs['pipeline']['peak_rss_gib']} GiB (predicted {out['accounting_check']['predicted_sequential_gib']}); "
          f"full: sequential {e['gpu_memory']['sequential_gib']} GiB, one-pass {e['gpu_memory']['one_pass_gib']} GiB, "
          f"offloaded {e['gpu_memory']['offloaded_sequential_gib']} GiB, packed {e['packed_checkpoint_gib']} GiB, "
          f"{e['offline_gpu_hours']} GPU hours -> {out_path}")


if __name__ == "__main__":
    main()
