"""Predicted decode speed of the packed (BQ) paper models against FP16: a memory-bandwidth roofline.

    python scripts/decode_roofline.py            # -> results/benchmarks/decode_roofline.json

Decode is memory bound: one step reads every weight it uses once, so a step takes at least
(bytes read) / (memory bandwidth). Per step of `batch` sequences:
- 16-bit: attention, norms, routers, shared experts and dense MLPs of every layer, the lm_head, one embedding
  row per sequence, and the KV cache at the mean context (prompt + new tokens / 2);
- routed experts: each MoE layer reads the experts its tokens route to; with batch B and uniform routing
  (top-k of E) that is E * (1 - (1 - k/E)^B) distinct experts. FP16 reads them at 16 bits per weight; packed
  BQ at `bits` per code plus a fp16 scale and a `bits`-bit zero per `group` weights; with slots, a slot
  table of `slot_fraction` of the expert weights at 8 bits (+ its own scale/zero per 128). Shared experts stay
  16-bit: a packed model packs only the routed experts.
Predicted tokens/s = batch * bandwidth / bytes per step; the speedup is the ratio of bytes. Parameter counts
come from the published configs (assets/configs/) built on the meta device. A prediction (an upper bound
that ignores kernel efficiency and launch overheads), never a measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OUT = REPO / "results" / "benchmarks" / "decode_roofline.json"

# Published peak memory bandwidths (datasheets; decimal units).
GPUS = {
    "A100-80GB-SXM": {"bandwidth_bytes_per_s": 2.039e12,
                      "source": "NVIDIA A100 Tensor Core GPU datasheet: A100 80GB SXM, GPU memory bandwidth 2,039 GB/s "
                                "(https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
                                "nvidia-a100-datasheet-nvidia-us-2188504-web.pdf)"},
    "H100-SXM": {"bandwidth_bytes_per_s": 3.35e12,
                 "source": "NVIDIA H100 Tensor Core GPU datasheet: H100 SXM, GPU memory bandwidth 3.35 TB/s "
                           "(https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet)"},
}
PAPER_SPEEDUP = "2.91-3.08x (DynaMo, arXiv 2503.21135, as cited in issue 27)"


def model_facts(name: str) -> dict:
    """Parameter counts per part and the KV bytes per token per layer, from the published config (meta device)."""
    from dynamo.adapters import moe_layers
    from dynamo.dryrun.build import build_model, dense_prefix, load_real_config

    values = load_real_config(name)
    model = build_model(name, None, device="meta")
    layers = model.model.layers
    moe = list(moe_layers(model))
    routed = sum(sum(p.numel() for p in m.experts.parameters()) for m in moe)
    layer_params = sum(p.numel() for p in layers.parameters())
    hidden, vocab = values["hidden_size"], values["vocab_size"]
    head = model.get_output_embeddings()
    if values.get("kv_lora_rank"):  # MLA caches the compressed latent and the rope key
        kv_per_token_layer = (values["kv_lora_rank"] + values["qk_rope_head_dim"]) * 2
    else:
        head_dim = values.get("head_dim") or hidden // values["num_attention_heads"]
        kv_per_token_layer = 2 * values.get("num_key_value_heads", values["num_attention_heads"]) * head_dim * 2
    experts = moe[0].n_experts if hasattr(moe[0], "n_experts") else None
    experts = experts or values.get("num_experts") or values.get("num_local_experts") or values["n_routed_experts"]
    return {"hidden": hidden, "vocab": vocab, "layers": len(layers), "moe_layers": len(moe),
            "dense_prefix": dense_prefix(values), "experts": experts, "top_k": values["num_experts_per_tok"],
            "routed_expert_params": routed, "expert_params": routed // (len(moe) * experts),
            "other_layer_params": layer_params - routed, "lm_head_params": head.weight.numel(),
            "kv_bytes_per_token_layer": kv_per_token_layer,
            "total_params": sum(p.numel() for p in model.parameters())}


def distinct_experts(experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts a MoE layer reads for `batch` tokens routed uniformly (top-k of E each)."""
    return experts * (1 - (1 - top_k / experts) ** batch)


def step_bytes(f: dict, batch: int, context: float, *, expert_bits_per_weight: float) -> dict:
    """Bytes one decode step of `batch` sequences reads, by part."""
    experts_read = distinct_experts(f["experts"], f["top_k"], batch) * f["moe_layers"]
    parts = {"attention_and_other_16bit": f["other_layer_params"] * 2,
             "lm_head_16bit": f["lm_head_params"] * 2,
             "embedding_rows": batch * f["hidden"] * 2,
             "kv_cache": batch * context * f["layers"] * f["kv_bytes_per_token_layer"],
             "routed_experts": experts_read * f["expert_params"] * expert_bits_per_weight / 8}
    return {**{k: round(v) for k, v in parts.items()}, "total": round(sum(parts.values()))}


def predict(f: dict, *, bits: float, group: int, slot_fraction: float, batch: int, context: float,
            gpus: dict = GPUS) -> dict:
    code = bits + (16 + bits) / group            # codes + fp16 scale + bits-bit zero per group
    slots = slot_fraction * (8 + (16 + 8) / 128)  # slot table: 8-bit values, fp16 scale + 8-bit zero per 128
    variants = {"fp16": 16.0, "bq": code, "bq_slots": code + slots}
    steps = {v: step_bytes(f, batch, context, expert_bits_per_weight=b) for v, b in variants.items()}
    out = {"bits_per_expert_weight": {v: round(b, 4) for v, b in variants.items()}, "bytes_per_step": steps,
           "speedup_vs_fp16": {v: round(steps["fp16"]["total"] / steps[v]["total"], 3) for v in ("bq", "bq_slots")},
           "expert_only_limit_16_over_bits": round(16 / bits, 3),
           "expert_only_limit_with_group_params": round(16 / code, 3),
           "tokens_per_s": {gpu: {v: round(batch * g["bandwidth_bytes_per_s"] / steps[v]["total"], 1)
                                  for v in variants} for gpu, g in gpus.items()}}
    return out


def readme_table(record: dict, bits: float = 3.0) -> str:
    """docs/scaling.md's predicted-speed table (3-bit rows), regenerated from the JSON (tests/test_roofline.py)."""
    gpus = list(record["gpus"])
    lines = ["| model | batch | FP16 GB read / step | BQ GB / step | predicted BQ speedup | predicted BQ + slots "
             "| experts alone <= 16/bits | " + " | ".join(f"predicted BQ tok/s {g}" for g in gpus)
             + " | measured speedup |",
             "|---|---|---|---|---|---|---|" + "---|" * len(gpus) + "---|"]
    for r in record["rows"]:
        if r["bits"] != bits:
            continue
        step = r["bytes_per_step"]
        lines.append(f"| {r['model']} | {r['batch']} | {step['fp16']['total'] / 1e9:.2f} | "
                     f"{step['bq']['total'] / 1e9:.2f} | {r['speedup_vs_fp16']['bq']:.2f}x | "
                     f"{r['speedup_vs_fp16']['bq_slots']:.2f}x | {r['expert_only_limit_16_over_bits']:.2f}x | "
                     + " | ".join(f"{r['tokens_per_s'][g]['bq']:,.0f}" for g in gpus) + " | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from dynamo.dryrun.build import REAL_MODELS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(REAL_MODELS))
    parser.add_argument("--bits", type=float, nargs="*", default=[2.0, 3.0, 4.0],
                        help="average code bits of the routed experts (BQ mixes widths; 3 is dynamo_3bit)")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--slot-fraction", type=float, default=0.01, help="slot table size / expert weights")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    context = args.prompt + args.new_tokens / 2  # mean KV length over the generated tokens
    rows = []
    for name in args.models:
        facts = model_facts(name)
        for batch in args.batches:
            for bits in args.bits:
                rows.append({"model": name, "batch": batch, "bits": bits,
                             **predict(facts, bits=bits, group=args.group, slot_fraction=args.slot_fraction,
                                       batch=batch, context=context)})
        rows[-1]["facts"] = facts  # once per model (on its last row)
    record = {"what": "PREDICTED decode speed (memory-bandwidth roofline), not measured: bytes each decode step reads "
                      "over the GPU's published peak bandwidth, packed BQ (and BQ + slot table) against FP16",
              "command": "python scripts/decode_roofline.py" + (" " + " ".join(argv) if argv else ""),
              "gpus": GPUS, "paper_speedup": PAPER_SPEEDUP,
              "assumptions": {"group_size": args.group, "slot_fraction": args.slot_fraction,
                              "prompt": args.prompt, "new_tokens": args.new_tokens, "mean_context": context,
                              "routing": "uniform: E * (1 - (1 - k/E)^batch) distinct experts per MoE layer and step",
                              "bound": "upper bound: peak bandwidth, no launch or compute time, "
                                       "no kernel inefficiency"},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    for r in rows:
        print(f"{r['model']:>17} batch {r['batch']} {r['bits']:.0f}-bit: BQ {r['speedup_vs_fp16']['bq']:.2f}x, "
              f"BQ+slots {r['speedup_vs_fp16']['bq_slots']:.2f}x "
              f"(experts alone <= {r['expert_only_limit_16_over_bits']}x)")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
