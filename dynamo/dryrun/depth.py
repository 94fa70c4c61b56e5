"""Does the adaptive switch's memory grow with depth? Real-shape dry runs of one model at several MoE
depths (scripts/dryrun.py, real width, CPU), side by side.

    OMP_NUM_THREADS=2 python scripts/dryrun_depth.py --model olmoe --depths 1 2 4
        # -> results/benchmarks/dryrun_depth_olmoe.json

Each depth is one `scripts/dryrun.py --model <m> --moe-layers <n> --no-export --set quant.method=rtn
--set quant.allocation.method=fcm` (BQ by RTN with the paper's fcm widths: GPTQ's solves and the budget
allocation's RTN error table grow with depth and are not the point here; the switch is the same
adaptive switch either way; no packed export or reload). The JSON gives per depth the switch
stage's peak RSS (`peak_rss_gib_by_stage.eval_ppl`: each dataset's switch, then its few windows),
the stage before it (the BQ evaluation, no switch), the model's weight bytes at the run's dtype, the
host master copy's bytes, and the switch's own `held_nbytes_peak` / `held_nbytes_by_layer` from the
run's record. The check: from the shallowest depth to each deeper one, the switch stage's peak
grows by no more than the added layers' own weights (model + the master copy of their experts, both
at the run's dtype), and the switch's held bytes stay those of one layer.
`--reuse` keeps a depth's JSON already under --work instead of running it again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from ..config import REPO_ROOT
from ..records import write_json_atomic

GIB = 1024 ** 3
OVERRIDES = ["quant.method=rtn", "quant.allocation.method=fcm"]


def depth_command(model: str, n: int, out: Path, work: Path, extra: list[str]) -> list[str]:
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "dryrun.py"), "--model", model, "--moe-layers", str(n),
           "--no-export", "--work", str(work / f"d{n}"), "--out", str(out)]
    for o in OVERRIDES + extra:
        cmd += ["--set", o]
    return cmd


def row(n: int, d: dict) -> dict:
    """One depth's numbers from its dryrun.py JSON."""
    sw = d["switch"] or {}
    stages = d["runs"]["pipeline"].get("peak_rss_gib_by_stage", {})
    master = sw.get("master_nbytes") or 0
    return {"moe_layers": n, "layers": d["truncated"]["layers"], "wall_s": d["runs"]["pipeline"]["wall_s"],
            "weights_nbytes": d["weights_nbytes_run_dtype"],
            "routed_expert_nbytes": d["routed_expert_nbytes_run_dtype"],
            "master_location": sw.get("master_location"), "master_nbytes": master,
            "peak_rss_gib": d["runs"]["pipeline"]["peak_rss_gib"], "peak_rss_gib_by_stage": stages,
            "switch_stage_peak_rss_gib": stages.get("eval_ppl"),
            "before_switch_peak_rss_gib": stages.get("eval_ppl_bq"),
            "held_nbytes_peak": sw.get("held_nbytes_peak"),
            "held_nbytes_by_layer": {k: v["held_nbytes_by_layer"] for k, v in sw.get("switches", {}).items()},
            "held_accounting_nbytes": (sw.get("accounting_nbytes") or {}).get("total"),
            "switch": {k: sw.get(k) for k in ("per_moe_layer_s", "held_nbytes_peak", "full")},
            "cpu_matmul_gflops": d["extrapolation"]["cpu_matmul_gflops"],
            "switch_s": {k: {p: v[p] for p in ("profile_s", "select_s", "write_s", "total_s",
                                                  "select_write_over_profile")}
                         for k, v in sw.get("switches", {}).items()}}


def check(rows: list[dict]) -> dict:
    """Growth from the shallowest depth: switch stage peak RSS against the added layers' own weights."""
    base, out = rows[0], {}
    for r in rows[1:]:
        grown = (r["switch_stage_peak_rss_gib"] - base["switch_stage_peak_rss_gib"]) * GIB
        weights = r["weights_nbytes"] - base["weights_nbytes"]
        with_master = weights + r["master_nbytes"] - base["master_nbytes"]
        out[f"{base['moe_layers']}->{r['moe_layers']}"] = {
            "switch_stage_growth_gib": round(grown / GIB, 3),
            "added_weights_gib": round(weights / GIB, 3),
            "added_weights_and_master_gib": round(with_master / GIB, 3),
            "held_nbytes_peak_ratio": round(r["held_nbytes_peak"] / base["held_nbytes_peak"], 4),
            "holds": bool(grown <= with_master and r["held_nbytes_peak"] <= 1.05 * base["held_nbytes_peak"])}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="olmoe")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--work", type=Path, default=Path("/tmp/dynamo-dryrun-depth"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="more run.py overrides for every depth (e.g. quant.switching.master=disk)")
    p.add_argument("--reuse", action="store_true", help="keep a depth's JSON already under --work")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    depths = sorted(set(args.depths))
    if len(depths) < 2:
        p.error("--depths needs at least two depths to compare")
    out = args.out or REPO_ROOT / "results" / "benchmarks" / f"dryrun_depth_{args.model}.json"
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    rows, commands = [], []
    for n in depths:
        json_path = args.work / f"depth_{args.model}_{n}.json"
        cmd = depth_command(args.model, n, json_path, args.work, args.overrides)
        commands.append(" ".join(["python", *cmd[1:]]).replace(str(REPO_ROOT) + "/", ""))
        if not (args.reuse and json_path.is_file()):
            subprocess.run(cmd, check=True, cwd=REPO_ROOT, env=env)
        rows.append(row(n, json.loads(json_path.read_text())))
    result = {"benchmark": "dryrun_depth", "model": args.model,
              "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python scripts/dryrun_depth.py "
                         f"--model {args.model} --depths {' '.join(map(str, depths))}"
                         + "".join(f" --set {o}" for o in args.overrides),
              "runs": commands, "overrides": OVERRIDES + args.overrides, "depths": rows, "check": check(rows),
              "note": "RSS on CPU (fp32 weights): the switch stage is 'eval_ppl' in dynamo/dryrun/rss.py's "
                      "attribution; held_nbytes_* are the switch's own (dynamo.switching.adaptive.AdaptiveReport)"}
    write_json_atomic(out, result)
    for r in rows:
        print(f"{args.model} {r['moe_layers']} MoE layer(s): switch stage {r['switch_stage_peak_rss_gib']} GiB "
              f"(before {r['before_switch_peak_rss_gib']}), weights {r['weights_nbytes'] / GIB:.2f} GiB, "
              f"held {r['held_nbytes_peak'] / GIB:.3f} GiB")
    print(json.dumps(result["check"], indent=1), f"-> {out}")
