"""Every kind of training-free repair at equal bytes, and the full GPTQ re-quantization they aim at (issue 26).

    OMP_NUM_THREADS=2 python scripts/dqs_compare.py --model testbed-qwen-moe [--budgets 0.005 0.01 0.02]

For each budget (a fraction of the routed experts' FP16 bytes), each policy of POLICIES (data: adding a candidate
kind is one entry; one the installed switcher refuses is skipped with a line) and each domain of the suite (known
and novel, as conf/dataset/<suite>.yaml says): KL removed (share of BQ's KL to FP16, 95% paired CI), PPL / BQ,
top-1 agreement, bytes, switch seconds, on held-out calib windows (where choices are made) and on test windows;
and realized / estimated: the routed experts' output error removed on the calib windows
(dynamo/diagnostics/routed.py) over the switch's expected_reduction. The ceiling: every expert re-quantized by
GPTQ on the domain's own calib windows at BQ's bit allocation. The bench is dynamo/diagnostics/dqs.py; the
tables and the figure come from dynamo/diagnostics/compare_report.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from dynamo.diagnostics.compare_report import budget_key, figure, markdown, summarize
from dynamo.diagnostics.dqs import FULL, QUICK, Bench, fmt
from dynamo.errors import UserError
from dynamo.records import device_info, package_versions, write_json_atomic

POLICIES = {  # name -> switcher spec (dynamo.diagnostics.dqs.Bench.switcher); adaptive: AdaptiveSwitcher kwargs
    "paper": {"policy": "paper"},   # its cache is fixed offline: one size, measured once
    "rows_cols": {"policy": "adaptive", "candidates": "rows_cols"},
    "experts8": {"policy": "adaptive", "candidates": "experts8"},
    "lowrank": {"policy": "adaptive", "candidates": "lowrank"},
    "rows_cols_lowrank": {"policy": "adaptive", "candidates": "rows_cols_lowrank"},   # what a packed model serves
    "all": {"policy": "adaptive", "candidates": "all"},
}
BUDGETS = [0.005, 0.01, 0.02]
MODELS = ["testbed-qwen-moe", "tiny-olmoe"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--quant", default="dynamo_3bit")
    parser.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    parser.add_argument("--domains", nargs="+", default=None, help="default: every domain of the suite")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the full GPTQ re-quantization per domain")
    parser.add_argument("--test-windows", type=int, default=FULL["test_windows"],
                        help="test windows per domain, evenly spaced (0: all)")
    parser.add_argument("--calib-eval-windows", type=int, default=FULL["calib_eval_windows"],
                        help="held-out calib windows per domain (the choice is made on them)")
    parser.add_argument("--quick", action="store_true", help="a few windows everywhere (a smoke test, not a result)")
    parser.add_argument("--out-dir", type=Path, default=Path("results") / "diagnostics")
    args = parser.parse_args()
    for b in args.budgets:
        if not 0.0 < b < 1.0:
            parser.error(f"--budgets: {b} is not a fraction in (0, 1)")
    sizes = QUICK if args.quick else {"calib_eval_windows": args.calib_eval_windows, "test_windows": args.test_windows}
    out = args.out_dir / f"dqs_compare_{args.model}.json"
    threads = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python scripts/dqs_compare.py " + " ".join(sys.argv[1:])

    with Bench(args.model, args.quant, args.domains, **sizes) as bench:
        switchers, skipped = {}, {}
        for name in args.policies:
            spec = POLICIES[name]
            for b in [None] if spec["policy"] == "paper" else args.budgets:
                try:
                    switchers[(name, budget_key(b))] = bench.switcher(spec, b)
                except UserError as err:
                    skipped[name] = str(err)
                    print(f"skipped policy {name}: {err}", flush=True)
                    break
        rows = {}
        for d in bench.domains:
            rows[d] = {"bq": bench.bq_row(d), "policies": {}}
            for (name, key), sw in switchers.items():
                row, _ = bench.measure_switch(sw, d, realized=True)
                rows[d]["policies"].setdefault(name, {})[key] = row
                print(f"{d:>10} {name:<10} {key:>6} test {fmt(row['test']['damage_removed'])} calib "
                      f"{fmt(row['calib']['damage_removed'])} bytes {row['switch'].get('extra_nbytes', '-')} "
                      f"realized/expected {row['realized']['over_expected']}", flush=True)
            if not args.no_ceiling:
                rows[d]["gptq_ceiling"], _ = bench.gptq_ceiling(d, realized=True)
                print(f"{d:>10} GPTQ ceiling test {fmt(rows[d]['gptq_ceiling']['test']['damage_removed'])}", flush=True)
            # written after every domain: a run stopped early still leaves what it measured (marked partial)
            save(out, {
                "script": "scripts/dqs_compare.py", "command": command, "model": args.model, "quant": args.quant,
                "quick": args.quick, "complete": list(rows) == bench.domains, "budgets": args.budgets,
                "policies": {n: POLICIES[n] for n in args.policies}, "skipped": skipped, "domains": list(rows),
                "planned_domains": bench.domains, "known": bench.known, "novel": [n for n in bench.novel if n in rows],
                "protocol": bench.protocol(), "expert_fp16_nbytes": bench.master.fp16_nbytes,
                "paper_cache_nbytes": bench.cache.nbytes, "bq_digest": bench.bq_digest, "bq_restored_bitwise": True,
                "domains_report": rows, "wall_s": bench.wall_s, "threads": torch.get_num_threads(),
                "device": device_info(torch.device("cpu")), "versions": package_versions()})
    print(f"-> {out}")


def save(out: Path, record: dict) -> None:
    record["summary"] = summarize(record)
    write_json_atomic(out, record, indent=None)  # ~9,000 lines indented: one line keeps the tree small
    out.with_suffix(".md").write_text(markdown(record))
    print(figure(record, out.with_suffix(".png")), flush=True)

if __name__ == "__main__":
    main()
