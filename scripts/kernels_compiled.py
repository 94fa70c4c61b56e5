"""Compile every kernel specialization for sm_80 (A100) and sm_90 (H100) on this CPU and report its resources.

    python scripts/kernels_compiled.py                    # all -> results/benchmarks/kernels_compiled.json
    python scripts/kernels_compiled.py --quick --out X    # a few specializations (the tests)

Specializations: `dynamo_kernels.specializations.enumerate_specializations` over the routed-expert shapes of
the six paper models (assets/configs/), with the tile configurations the launchers' heuristic picks on each
target. Per specialization and target: registers per thread, spill stores/loads (ptxas -v, which Triton runs),
stack frame and local memory (Triton's bundled `cuobjdump -res-usage`), shared memory (Triton's metadata:
its pipelining buffers are dynamic shared memory), and the programs per SM those allow. Compiled, not run:
nothing here is a GPU measurement.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, set to silence its warning

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dynamo_kernels.specializations import (TARGETS, enumerate_specializations, expert_shape,  # noqa: E402
                                            resources)

OUT = REPO / "results" / "benchmarks" / "kernels_compiled.json"


def paper_shapes(configs: Path = REPO / "assets" / "configs"):
    return [expert_shape(p.stem, json.loads(p.read_text())) for p in sorted(configs.glob("*.json"))]


def spill_reason(spec, res: dict) -> str | None:
    """Why a specialization spills, from its own constants and resources (None when it does not)."""
    if not (res["spill_store_bytes"] or res["local_memory_bytes"]):
        return None
    c = dict(spec.constexprs)
    threads = 32 * res["num_warps"]
    tile = c["BLOCK_K"] * c["BLOCK_N"]
    planes = "two bit planes" if c["HIGH_BITS"] else "one bit plane"
    groups = "a scale and zero per output column" if spec.group_size == -1 or spec.group_size % c["BLOCK_K"] == 0 \
        else "a scale and zero per element"
    return (f"the {c['BLOCK_K']}x{c['BLOCK_N']} dequantized tile is {tile // threads} fp32 values per thread "
            f"({threads} threads), unpacked from {planes} with {groups}, next to a {c['BLOCK_M']}x{c['BLOCK_N']} "
            f"fp32 accumulator and the {c['BLOCK_M']}x{c['BLOCK_K']} activations: {res['registers_per_thread']} "
            f"registers (the cap is 255) do not hold it, so ptxas spills {res['spill_store_bytes']} bytes per thread "
            f"(L1-resident local memory). A smaller BLOCK_K or 8 warps would remove it; not changed without a GPU "
            f"to time the alternative")


def readme_table(record: dict) -> str:
    """docs/scaling.md's compile table, regenerated from the JSON (tests/kernels/test_compile.py)."""
    lines = ["| kernel | target | specializations (cubins) | registers / thread | spilling cubins (bytes / thread) "
             "| shared memory (KB) | programs / SM (limited by) |", "|---|---|---|---|---|---|---|"]
    for key, s in record["summary"].items():
        kernel, target = key.split("/")
        rows = [r for r in record["specializations"] if r["kernel"] == kernel and r["target"] == target]
        spills = [r["spill_store_bytes"] for r in rows if r["spill_store_bytes"]]
        spill = f"{s['spilling']} ({min(spills)}-{max(spills)})" if spills else "0"
        lines.append(f"| {kernel} | {target} | {s['specializations']} ({s['compiled']}) | {s['registers_per_thread'][0]}-"
                     f"{s['registers_per_thread'][1]} | {spill} | {s['shared_memory_bytes'][0] / 1024:.1f}-"
                     f"{s['shared_memory_bytes'][1] / 1024:.1f} | {s['programs_per_sm'][0]}-{s['programs_per_sm'][1]} "
                     f"({', '.join(s['limited_by'])}) |")
    for key in [k for k in record if k.startswith("block_k_") and k.endswith("_sample")]:
        k = key.split("_")[2]
        lines += ["", f"| spilling default (fp16, group 128, 16-row tile) | registers / spill bytes / shared KB / "
                      f"programs per SM at the default | at BLOCK_K={k} |", "|---|---|---|"]
        for row in record[key]["rows"]:
            a, b = row["at_default"], row[f"at_block_k_{k}"]
            fmt = lambda r: (f"{r['registers_per_thread']} / {r['spill_store_bytes']} / "  # noqa: E731
                             f"{r['shared_memory_bytes'] / 1024:.1f} / {r['programs_per_sm']}")
            lines.append(f"| {row['specialization']} | {fmt(a)} | {fmt(b) if isinstance(b, dict) else b} |")
    return "\n".join(lines)


def _device_note() -> str:
    import torch

    if torch.cuda.is_available():
        return (f"compiled on a machine with {torch.cuda.get_device_name()}: rows of its architecture also carry "
                f"the driver's own register and spill counts (driver_n_regs, driver_n_spills)")
    return "compiled on a CPU (no GPU): ptxas and cuobjdump figures only"


def _resources_or_error(spec):
    try:
        return resources(spec)
    except Exception as err:  # noqa: BLE001 - a failure is a result: recorded with its specialization
        return str(err)[-2000:]


def dump(record: dict) -> str:
    """The report as JSON: one line per specialization (the file stays small), the rest indented."""
    rows = record["specializations"]
    text = json.dumps({**record, "specializations": "@ROWS@"}, indent=1)
    lines = ",\n  ".join(json.dumps(r, separators=(",", ":")) for r in rows)
    return text.replace('"@ROWS@"', "[\n  " + lines + "\n ]") + "\n"


def code_class(spec) -> tuple:
    """Specializations that compile to one cubin: the same but for the value of SPLIT_K > 1."""
    consts = tuple((k, min(v, 2) if k == "SPLIT_K" else v) for k, v in spec.constexprs)
    return (spec.kernel, spec.arch, spec.dtype, spec.bits, spec.group_size, consts, spec.signature)


def _report(specs, results, rows: list, failures: list, covered: dict):
    for i, (spec, res) in enumerate(zip(specs, results)):
        if isinstance(res, str):
            failures.append({"specialization": spec.name, "error": res})
            print(f"[{i + 1}/{len(specs)}] FAILED {spec.name}", flush=True)
            yield spec
            continue
        reason = spill_reason(spec, res)
        members = covered[spec.name]
        launches = [u for m in members for u in m.used_by]
        rows.append({"specialization": spec.name, "kernel": spec.kernel, "target": f"sm_{spec.arch}",
                     "dtype": spec.dtype, "bits": spec.bits, "group_size": spec.group_size,
                     "constexprs": dict(spec.constexprs),
                     **({"same_cubin_as": [m.name for m in members[1:]]} if len(members) > 1 else {}),
                     "used_by": sorted({u.split(":")[0] for u in launches}), "launches": launches, **res,
                     **({"spill_reason": reason} if reason else {})})
        print(f"[{i + 1}/{len(specs)}] {spec.name}: {res['registers_per_thread']} regs, spills "
              f"{res['spill_store_bytes']} B, shared {res['shared_memory_bytes']} B, "
              f"{res['programs_per_sm']} programs/SM ({res['limited_by']})", flush=True)
        yield spec


def add_block_k_sample(out: Path, block_k: int, jobs: int) -> int:
    """Recompile a sample of the report's spilling rows with a smaller BLOCK_K (what a retune would change)."""
    from dynamo_kernels.specializations import Specialization

    record = json.loads(out.read_text())
    by_name = {s.name: s for s in enumerate_specializations(paper_shapes())}
    sample, seen = [], set()
    for row in record["specializations"]:
        c = row["constexprs"]
        key = (row["kernel"], row["target"], row["bits"])
        if (row["spill_store_bytes"] and row["dtype"] == "fp16" and row["group_size"] == 128
                and c["BLOCK_M"] == 16 and c["BLOCK_K"] > block_k and key not in seen):
            seen.add(key)
            spec = by_name[row["specialization"]]
            smaller = Specialization(**{**spec.__dict__, "constexprs": tuple(sorted({**dict(spec.constexprs),
                                                                                     "BLOCK_K": block_k}.items()))})
            sample.append((row, smaller))
    with ProcessPoolExecutor(jobs) if jobs > 1 else nullcontext() as pool:
        results = list((pool.map if pool else map)(_resources_or_error, [s for _, s in sample]))
    rows = []
    for (row, smaller), res in zip(sample, results):
        keep = ("registers_per_thread", "spill_store_bytes", "shared_memory_bytes", "programs_per_sm", "limited_by")
        rows.append({"specialization": row["specialization"], "at_default": {k: row[k] for k in keep},
                     f"at_block_k_{block_k}": res if isinstance(res, str) else {k: res[k] for k in keep}})
        print(f"{smaller.name}: {rows[-1][f'at_block_k_{block_k}']}", flush=True)
    record[f"block_k_{block_k}_sample"] = {
        "what": f"spilling default specializations recompiled with BLOCK_K={block_k} (not what the launchers pick "
                f"today: a lead for retuning _block_k once a GPU can time both)", "rows": rows}
    record["command"] += f" && python scripts/kernels_compiled.py --add-block-k-sample {block_k}"
    out.write_text(dump(record))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--quick", action="store_true", help="one specialization per kernel and target (tests)")
    parser.add_argument("--archs", type=int, nargs="*", default=list(TARGETS))
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--every-split-k", action="store_true",
                        help="compile each SPLIT_K > 1 value separately (they give one cubin; default: one each)")
    parser.add_argument("--add-block-k-sample", type=int, default=None, metavar="K",
                        help="add to --out's existing report: one spilling specialization per kernel, target and "
                             "width (fp16, group 128, 16-row tile) recompiled with BLOCK_K=K, for comparison")
    args = parser.parse_args(argv)
    if args.add_block_k_sample:
        return add_block_k_sample(args.out, args.add_block_k_sample, args.jobs)

    import triton

    every = enumerate_specializations(paper_shapes(), archs=tuple(args.archs))
    # SPLIT_K appears in the kernel only as `SPLIT_K == 1`: every value > 1 compiles to the same cubin (tested),
    # so one of them stands for its class unless --every-split-k
    classes: dict[tuple, list] = {}
    for spec in every:
        classes.setdefault(code_class(spec) if not args.every_split_k else spec, []).append(spec)
    specs = [members[0] for members in classes.values()]
    covered = {members[0].name: members for members in classes.values()}
    if args.quick:
        seen, picked = set(), []
        for spec in specs:
            if (spec.kernel, spec.arch) not in seen:
                seen.add((spec.kernel, spec.arch))
                picked.append(spec)
        specs = picked
    rows, failures = [], []
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) if args.jobs > 1 else nullcontext() as pool:
        results = pool.map(_resources_or_error, specs) if pool else map(_resources_or_error, specs)
        done = list(_report(specs, results, rows, failures, covered))
    assert len(done) == len(specs)

    summary = {}
    for kernel in sorted({r["kernel"] for r in rows}):
        for target in sorted({r["target"] for r in rows}):
            sel = [r for r in rows if r["kernel"] == kernel and r["target"] == target]
            if not sel:
                continue
            regs = [r["registers_per_thread"] for r in sel]
            progs = [r["programs_per_sm"] for r in sel]
            summary[f"{kernel}/{target}"] = {
                "specializations": sum(1 + len(r.get("same_cubin_as", [])) for r in sel), "compiled": len(sel),
                "registers_per_thread": [min(regs), max(regs)],
                "spilling": sum(1 for r in sel if r["spill_store_bytes"] or r["local_memory_bytes"]),
                "shared_memory_bytes": [min(r["shared_memory_bytes"] for r in sel),
                                        max(r["shared_memory_bytes"] for r in sel)],
                "programs_per_sm": [min(progs), max(progs)],
                "limited_by": sorted({r["limited_by"] for r in sel})}
    record = {
        "what": "every Triton kernel specialization the harness launches for the six paper models' routed experts, "
                "compiled for sm_80 and sm_90 on a CPU (no GPU): PTX -> ptxas -> cubin. Resources are compile-time "
                "facts; no kernel was run and no speed measured",
        "command": "python scripts/kernels_compiled.py" + (" --quick" if args.quick else "")
                   + (" --every-split-k" if args.every_split_k else ""),
        "device": _device_note(),
        "targets": {f"sm_{a}": TARGETS[a] for a in args.archs},
        "triton": triton.__version__, "python": platform.python_version(),
        "shapes": [s.__dict__ for s in paper_shapes()],
        "specializations_launched": len(every), "compiled": len(rows), "failed": len(failures),
        "seconds": round(time.perf_counter() - start, 1),
        "summary": summary, "failures": failures, "specializations": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dump(record))
    print(f"{len(rows)} compiled ({len(every)} specializations), {len(failures)} failed -> {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
