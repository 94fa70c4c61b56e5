"""The adaptive switch's own memory against depth, at a paper model's real width, on CPU.

    OMP_NUM_THREADS=2 python scripts/switch_depth_memory.py [--model olmoe] [--depths 1 2 4]

For each depth, in a fresh process: the model's architecture with that many MoE layers (random
weights, --dtype), its master copy (host), BQ by RTN-3 (group 128), then one adaptive switch to
--windows x --seqlen random tokens (the harness's defaults: rows + columns, Hessian scoring, 8-bit
slots, 1% budget). The process's RSS is sampled every 10 ms: `switch_peak_over_before` is the
switch's peak RSS minus the RSS just before it (the model, master and BQ already resident), i.e.
what the switch itself adds. Target: it does not grow with depth (the added layers' weights are in
the baseline). Writes results/benchmarks/switch_depth_memory_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from dynamo.config import REPO_ROOT
from dynamo.records import device_info, package_versions, write_json_atomic

GIB = 1024 ** 3


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def one_depth(model_name: str, moe_layers: int, dtype: str, windows: int, seqlen: int) -> dict:
    """Runs in its own process: build, quantize, switch once, report the RSS around the switch."""
    from dynamo.adapters import moe_layers as layers_of
    from dynamo.dryrun import build_model, load_real_config
    from dynamo.dryrun.build import dense_prefix
    from dynamo.quant import QSpec, QuantPlan, apply_plan
    from dynamo.switching.adaptive import AdaptiveSwitcher, ExpertMaster

    values = load_real_config(model_name)
    model = build_model(model_name, dense_prefix(values) + moe_layers, dtype=getattr(torch, dtype)).eval()
    master = ExpertMaster(model)
    plan = QuantPlan(method="rtn", default=QSpec(3, group_size=128))
    apply_plan(model, plan)
    switcher = AdaptiveSwitcher(model, plan, master)
    ids = torch.randint(0, 8192, (windows, seqlen), generator=torch.Generator().manual_seed(0))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak, done = [rss()], threading.Event()

    def sample():
        while not done.wait(0.01):
            peak[0] = max(peak[0], rss())

    before = rss()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t = time.perf_counter()
    report = switcher.switch_to(ids)
    seconds = time.perf_counter() - t
    done.set()
    thread.join()
    peak[0] = max(peak[0], rss())
    return {"moe_layers": len(list(layers_of(model))), "model_weight_bytes": weights, "master_bytes": master.nbytes,
            "rss_before_switch": before, "rss_peak_in_switch": peak[0],
            "switch_peak_over_before": peak[0] - before, "held_nbytes_peak": report.held_nbytes_peak,
            "held_nbytes_by_layer": report.held_nbytes_by_layer, "switch_s": round(seconds, 2),
            "profile_s": round(report.profile_s, 2), "select_s": round(report.select_s, 2),
            "write_s": round(report.write_s, 2), "slots": report.slots}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="olmoe")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the per-depth child
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_depth(args.model, args.one, args.dtype, args.windows, args.seqlen)))
        return
    out = args.out or REPO_ROOT / "results" / "benchmarks" / f"switch_depth_memory_{args.model}.json"
    rows = []
    for depth in args.depths:
        cmd = [sys.executable, __file__, "--model", args.model, "--dtype", args.dtype, "--windows",
               str(args.windows), "--seqlen", str(args.seqlen), "--one", str(depth)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{args.model} {depth} MoE layer(s): switch adds {r['switch_peak_over_before'] / GIB:.3f} GiB over "
              f"{r['rss_before_switch'] / GIB:.2f} GiB (held {r['held_nbytes_peak'] / GIB:.3f} GiB), "
              f"{r['switch_s']} s", flush=True)
    base = rows[0]["switch_peak_over_before"]
    result = {"script": "scripts/switch_depth_memory.py",
              "command": "OMP_NUM_THREADS=2 python scripts/switch_depth_memory.py " + " ".join(sys.argv[1:]),
              "model": args.model, "dtype": args.dtype, "sample": [args.windows, args.seqlen], "depths": rows,
              "switch_added_over_shallowest": [r["switch_peak_over_before"] / base for r in rows],
              "target": "the switch's added RSS does not grow with depth (the added layers' weights are resident "
                        "before it)",
              "threads": torch.get_num_threads(), "device": device_info(torch.device("cpu")),
              "versions": package_versions()}
    write_json_atomic(out, result)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
