"""What a full run of each paper model needs, by accounting from its exact shapes (no weights built):
GPU memory of the offline stage (sequential, one-pass, offloaded sequential), the packed checkpoint's
disk, the hours measured by scripts/dryrun.py where a dry run exists, and one adaptive switch (DQS):
its peak memory by the same accounting the multi-layer dry run checks (scripts/dryrun_depth.py:
weights + slot budget + the switch sample's hidden states + ONE MoE layer's Hessians and candidates,
whatever the depth) and its seconds (a dry run's per-MoE-layer profile, select and write seconds x the
MoE layers, the profile scaled to the switch sample's tokens; this CPU, where the dry run has them).

    python scripts/full_run_needs.py      # -> results/benchmarks/full_run_needs.json + a Markdown table

Assumptions (the users' main command in docs/method.md, quant=dynamo_4bit): bf16 weights; calibration 4 known
datasets x 32 windows x 512 tokens held as one layer's inputs and outputs; fp32 Hessians of one
MoE layer (all of them for one-pass); DQS cache = analysis.dynamic_channel_frac (1%) of the routed
weights in fp16, twice (the FP16 rows and the BQ copy for the way back); packed experts at
4.0 code bits + an fp16 scale and zero per 128 weights (4.25 bits). The adaptive switch (the default
policy): budget 1% of the routed experts' fp16 bytes on the device, 4 windows x 512 tokens profiled,
its FP16 master copy in host RAM (quant.switching.master=host) or read from disk (=disk), not on the GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dynamo.adapters import moe_layers  # noqa: E402
from dynamo.dryrun import REAL_MODELS, build_model, load_real_config, param_bytes  # noqa: E402
from dynamo.dryrun.extrapolate import (GIB, layer_stats_nbytes, memory_model, switch_held_nbytes,  # noqa: E402
                                       switch_needs, switch_select_flops)
from dynamo.records import write_json_atomic  # noqa: E402

CALIB_TOKENS = 4 * 32 * 512
DQS_FRAC = 0.01
PACKED_BITS = 4.0 + 2 * 16 / 128
SWITCH_BUDGET_FRAC = 0.01   # quant.switching.budget_frac
SWITCH_TOKENS = 4 * 512     # quant.switching.sample_windows x analysis.seqlen
OUT = REPO / "results" / "benchmarks" / "full_run_needs.json"


def needs(name: str) -> dict:
    values = load_real_config(name)
    model = build_model(name, None, device="meta")
    params = param_bytes(model)
    dqs = round(2 * 2 * DQS_FRAC * params["routed_expert_params"])
    mem = memory_model(model, calib_tokens=CALIB_TOKENS, hidden=values["hidden_size"], dqs_cache=dqs)
    disk = 2 * (params["params"] - params["routed_expert_params"]) + params["routed_expert_params"] * PACKED_BITS / 8
    dry = REPO / "results" / "benchmarks" / f"dryrun_{name}.json"
    dry_json = json.loads(dry.read_text()) if dry.is_file() else {}
    hours = dry_json["extrapolation"]["offline_gpu_hours"] if dry_json else None
    n_moe = len(list(moe_layers(model)))
    budget = int(SWITCH_BUDGET_FRAC * 2 * params["routed_expert_params"])
    held = switch_held_nbytes(model, budget)
    measured = dry_json.get("switch") or None  # a dry run with the per-layer switch (older ones have none)
    depth = REPO / "results" / "benchmarks" / f"dryrun_depth_{name}.json"
    switch_only = REPO / "results" / "benchmarks" / f"dryrun_switch_{name}.json"  # dryrun.py --no-export, RTN BQ
    if measured is None and depth.is_file():  # else the depth study's deepest run (scripts/dryrun_depth.py)
        measured, dry = json.loads(depth.read_text())["depths"][-1]["switch"], depth
    elif measured is None and switch_only.is_file():
        measured, dry = json.loads(switch_only.read_text())["switch"], switch_only
    switch = switch_needs(None, held["total"], moe_layers_full=n_moe, weights=params["bytes"], budget=budget,
                          activations=2 * SWITCH_TOKENS * values["hidden_size"] * 2)
    if measured and measured.get("full"):  # seconds: scripts/dryrun.py's switch_needs of its per-layer seconds
        switch.update({k: measured["full"][k] for k in ("profile_s", "select_s", "write_s", "seconds")})
    switch.update(select_tflop=round(switch_select_flops(model) / 1e12, 1), held_accounting=held, held_measured_nbytes=measured["held_nbytes_peak"] if measured else None,
                  seconds_from=str(dry.relative_to(REPO)) if measured else "no dry run with the per-layer switch",
                  seconds_basis="this CPU (the dry run's threads), not a GPU")
    return {"model": name, "params_b": round(params["params"] / 1e9, 2), "bf16_gib": round(params["bytes"] / GIB, 1),
            "layer_stats_gib": round(layer_stats_nbytes(model)["total"] / GIB, 2), **mem.to_dict(),
            "packed_checkpoint_gib": round(disk / GIB, 1), "offline_gpu_hours": hours,
            "hours_from": str(dry.relative_to(REPO)) if hours else "no dry run", "switch": switch}


def main() -> None:
    rows = [needs(name) for name in REAL_MODELS]
    write_json_atomic(OUT, {"benchmark": "full_run_needs", "command": "python scripts/full_run_needs.py",
                            "assumptions": __doc__.split("Assumptions", 1)[1].strip(), "rows": rows})
    print("| model | params | bf16 weights | Hessians, one MoE layer | GPU: sequential | GPU: one-pass | "
          "GPU: offloaded sequential | packed checkpoint | offline hours (A100 / H100) | switch: peak GPU memory "
          "(held, one MoE layer) | switch: scoring work | switch: seconds, this CPU (profile / select / write) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        h, sw = r["offline_gpu_hours"], r["switch"]
        hours = f"{h['A100']} / {h['H100']}" if h else "not measured"
        secs = (f"{sw['seconds']} ({sw['profile_s']} / {sw['select_s']} / {sw['write_s']})" if "seconds" in sw
                else "not measured")
        print(f"| {r['model']} | {r['params_b']} B | {r['bf16_gib']} GiB | {r['layer_stats_gib']} GiB | "
              f"{r['sequential_gib']} GiB | {r['one_pass_gib']} GiB | {r['offloaded_sequential_gib']} GiB | "
              f"{r['packed_checkpoint_gib']} GiB | {hours} | {sw['peak_gib']} GiB ({sw['held_gib']} GiB) | "
              f"{sw['select_tflop']} TFLOP | {secs} |")


if __name__ == "__main__":
    main()
