"""The short table a run prints at the end."""

from __future__ import annotations

from .switching.base import SwitchSummary


def summary_table(record: dict, known: list[str]) -> str:
    ppl = record["metrics"]["ppl"]
    lm_eval = record["metrics"].get("lm_eval", {})
    # beside the run's PPL: the same model before quantizing, and BQ alone when DQS switched
    extra = [(title, record["metrics"][key]) for title, key in (("BQ PPL", "ppl_bq"), ("FP16 PPL", "ppl_fp16"))
             if key in record["metrics"]]
    # fidelity to the FP16 model: mean token KL (nats), of the run and of BQ alone
    kl = [(title, record["metrics"][key]) for title, key in (("KL", "kl"), ("BQ KL", "kl_bq"))
          if key in record["metrics"]]
    rows = [("dataset", "role", "token PPL", *(t for t, _ in extra), *(t for t, _ in kl), "windows",
             "bits/byte (lm-eval)")]
    for name, value in ppl.items():
        windows = record["protocol"]["ppl"][name]["windows"]
        bpb = lm_eval.get(f"dynamo_{name}", {}).get("bits_per_byte")
        rows.append((name, "known" if name in known else "novel", f"{value:.3f}",
                     *(f"{m[name]:.3f}" for _, m in extra), *(f"{m[name]:.5f}" for _, m in kl), str(windows),
                     "" if bpb is None else f"{bpb:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    others = {task: m for task, m in lm_eval.items() if not any(task == f"dynamo_{n}" for n in ppl)}
    for task, metrics in others.items():
        lines.append(f"{task}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    model, quant = record["model"], record["quant"]
    seqlen = next(iter(record["protocol"]["ppl"].values()))["seqlen"]
    head = (f"{model['name']} ({model['class']}, {model['dtype']}) quant={quant['name']}  "
            f"seqlen={seqlen}  {record['timings']['total_s']:.1f} s")
    bits = record["metrics"].get("avg_bits")
    if bits:
        lines.append(f"avg bits: routed experts {bits['experts']:.3f} ({bits['experts_codes_only']:.3f} without "
                     f"group scales/zeros), all weights {bits['all']:.3f}")
    switching = record.get("switching")
    if switching:  # dynamo.switching.base.SwitchSummary's fields: the same whatever the policy
        switches = switching["switches"].values()
        slowest = max(s["total_s"] for s in switches) * 1e3
        exact = max(s["exact_bits"] for s in switches)
        dqs = SwitchSummary.of_record(switching)
        lines.append(f"DQS ({dqs.policy}, {dqs.variant}): {dqs.resident_as} {dqs.resident_nbytes} bytes, "
                     f"{slowest:.0f} ms per switch at most, exact bits up to {exact:.3f}")
    analysis = record.get("analysis")
    if analysis:
        lines.append(f"analysis: {analysis['metric']} on {', '.join(analysis['datasets'])}, "
                     f"{analysis['share_of_offline']:.1%} of the offline stage")
    return "\n".join([head, *lines])
