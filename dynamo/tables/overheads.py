"""The paper's overhead table on the embedded models, from the DynaMo records' own timings."""

from __future__ import annotations

from .records import MODELS, pick


def render_overheads(records: list[dict]) -> str:
    """The paper's overhead table on the embedded models, from the DynaMo records' own timings."""
    chosen = pick(records, ("dynamo_embedded",))
    lines = ["# Overheads of DynaMo on the embedded models (paper: analysis 14.9-17.3% of offline time, "
             "switching 7.7-10.7% of online time, cache ~1% of weights)", "",
             "From the records of `python run.py -m experiment=dynamo_embedded` (CPU; threads: the record's "
             "`device.threads`, as compared seconds need the same count). Analysis share = "
             "capture seconds / (capture + quantization). Switching share = all switches / the BQ + DQS "
             "evaluation pass that contains them. Rewrite = the cache lookup and write of one switch (paper policy) "
             "or the slot writes (adaptive). Device bytes = the channel cache, or the adaptive slots at most.", "",
             "| model | quant | threads | analysis s | quantize s | analysis share | switch ms (median) | rewrite ms (median) "
             "| switching share | device bytes | device / expert bytes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        for quant in ("dynamo_3bit", "dynamo_paper"):
            r = chosen.get((model, quant))
            if r is None or "switching" not in r:
                continue
            sw, an = r["switching"], r["analysis"]
            totals = sorted(x["total_s"] for x in sw["switches"].values())
            # the paper policy rewrites from its channel cache (requant_s); the adaptive one writes its slots
            rewrites = sorted(x.get("requant_s", x.get("write_s")) for x in sw["switches"].values())
            share = sum(totals) / r["timings"]["eval_ppl_s"]
            if "cache" in sw:
                device_bytes, fraction = sw["cache"]["nbytes"], sw["cache"]["fraction_of_expert_bytes_fp16"]
            else:  # adaptive: the most slot bytes any switch put on the device
                device_bytes = max(x["extra_nbytes"] for x in sw["switches"].values())
                fraction = device_bytes / sw["expert_fp16_nbytes"]
            lines.append(f"| {model} | {quant} | {r['device'].get('threads', '')} | {an['capture_s']:.1f} | {r['timings']['quantize_s']:.1f} | "
                         f"{100 * an['share_of_offline']:.1f}% | {1e3 * totals[len(totals) // 2]:.0f} | "
                         f"{1e3 * rewrites[len(rewrites) // 2]:.1f} | {100 * share:.1f}% | {device_bytes} | "
                         f"{100 * fraction:.3f}% |")
    return "\n".join(lines) + "\n"
