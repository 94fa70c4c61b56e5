"""What a full run of each paper model needs, by accounting from its exact shapes (no weights built):
GPU memory of the offline stage (sequential, one-pass, offloaded sequential), the packed checkpoint's
disk, and the hours measured by scripts/dryrun.py where a dry run exists.

    python scripts/full_run_needs.py      # -> results/benchmarks/full_run_needs.json + a Markdown table

Assumptions (the README's main command, quant=dynamo_4bit): bf16 weights; calibration 4 known
datasets x 32 windows x 512 tokens held as one layer's inputs and outputs; fp32 Hessians of one
MoE layer (all of them for one-pass); DQS cache = analysis.dynamic_channel_frac (1%) of the routed
weights in fp16, twice (the FP16 rows and the BQ copy for the way back); packed experts at
4.0 code bits + an fp16 scale and zero per 128 weights (4.25 bits).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dynamo.dryrun import REAL_MODELS, build_model, load_real_config, param_bytes  # noqa: E402
from dynamo.dryrun.extrapolate import GIB, layer_stats_nbytes, memory_model  # noqa: E402
from dynamo.records import write_json_atomic  # noqa: E402

CALIB_TOKENS = 4 * 32 * 512
DQS_FRAC = 0.01
PACKED_BITS = 4.0 + 2 * 16 / 128
OUT = REPO / "results" / "benchmarks" / "full_run_needs.json"


def needs(name: str) -> dict:
    values = load_real_config(name)
    model = build_model(name, None, device="meta")
    params = param_bytes(model)
    dqs = round(2 * 2 * DQS_FRAC * params["routed_expert_params"])
    mem = memory_model(model, calib_tokens=CALIB_TOKENS, hidden=values["hidden_size"], dqs_cache=dqs)
    disk = 2 * (params["params"] - params["routed_expert_params"]) + params["routed_expert_params"] * PACKED_BITS / 8
    dry = REPO / "results" / "benchmarks" / f"dryrun_{name}.json"
    hours = json.loads(dry.read_text())["extrapolation"]["offline_gpu_hours"] if dry.is_file() else None
    return {"model": name, "params_b": round(params["params"] / 1e9, 2), "bf16_gib": round(params["bytes"] / GIB, 1),
            "layer_stats_gib": round(layer_stats_nbytes(model)["total"] / GIB, 2), **mem.to_dict(),
            "packed_checkpoint_gib": round(disk / GIB, 1), "offline_gpu_hours": hours,
            "hours_from": str(dry.relative_to(REPO)) if hours else "no dry run"}


def main() -> None:
    rows = [needs(name) for name in REAL_MODELS]
    write_json_atomic(OUT, {"benchmark": "full_run_needs", "command": "python scripts/full_run_needs.py",
                            "assumptions": __doc__.split("Assumptions", 1)[1].strip(), "rows": rows})
    print("| model | params | bf16 weights | Hessians, one MoE layer | GPU: sequential | GPU: one-pass | "
          "GPU: offloaded sequential | packed checkpoint | offline hours (A100 / H100) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        h = r["offline_gpu_hours"]
        hours = f"{h['A100']} / {h['H100']}" if h else "not measured"
        print(f"| {r['model']} | {r['params_b']} B | {r['bf16_gib']} GiB | {r['layer_stats_gib']} GiB | "
              f"{r['sequential_gib']} GiB | {r['one_pass_gib']} GiB | {r['offloaded_sequential_gib']} GiB | "
              f"{r['packed_checkpoint_gib']} GiB | {hours} |")


if __name__ == "__main__":
    main()
