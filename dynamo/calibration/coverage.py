"""How evenly the calibration tokens reached the experts: the table printed and saved with a run."""

from __future__ import annotations

from .stats import CalibrationStats

FULL_TABLE_MAX_EXPERTS = 16


def coverage_summary(stats: CalibrationStats) -> dict:
    """JSON-ready: per MoE layer the routed-token count of every expert, and how uneven it is."""
    layers = {}
    for i in sorted(stats.layers):
        counts = stats.layers[i].routed.tokens.cpu().double()
        share = counts / counts.sum().clamp(min=1)
        layers[str(i)] = {
            "tokens": [int(x) for x in counts.tolist()],
            "min": int(counts.min()), "median": float(counts.median()), "max": int(counts.max()),
            # max / mean load: 1.0 is perfectly even, n_experts means one expert takes everything
            "max_over_mean": float(counts.max() / counts.mean().clamp(min=1e-9)),
            "cv": float(counts.std() / counts.mean().clamp(min=1e-9)),
            "entropy_bits": float(-(share[share > 0] * share[share > 0].log2()).sum()),
            "under_min_tokens": [e for e, n in enumerate(counts.tolist()) if n < stats.min_tokens],
        }
    return {"min_tokens": stats.min_tokens, "windows": stats.windows, "seqlen": stats.seqlen,
            "route_all": [list(x) for x in stats.route_all], "rtn_fallback": [list(x) for x in stats.rtn_fallback],
            "layers": layers}


def coverage_table(stats: CalibrationStats) -> str:
    """Rows = MoE layers. Every expert's count when there are few experts, else a summary."""
    summary = coverage_summary(stats)
    n_experts = len(next(iter(summary["layers"].values()))["tokens"])
    lines = [f"routed calibration tokens per expert ({stats.windows} windows x {stats.seqlen} tokens; "
             f"min_tokens={stats.min_tokens})"]
    if n_experts <= FULL_TABLE_MAX_EXPERTS:
        width = max(6, len(str(max(max(s["tokens"]) for s in summary["layers"].values()))) + 1)
        lines.append("layer " + "".join(f"E{e}".rjust(width) for e in range(n_experts)) + "   max/mean")
        for i, s in summary["layers"].items():
            cells = "".join((f"{n}*" if n < stats.min_tokens else str(n)).rjust(width) for n in s["tokens"])
            lines.append(f"{i:>5} {cells}   {s['max_over_mean']:8.2f}")
        lines.append("(* under min_tokens)")
    else:
        lines.append("layer      min   median      max  max/mean  under min_tokens")
        for i, s in summary["layers"].items():
            lines.append(f"{i:>5} {s['min']:8d} {s['median']:8.0f} {s['max']:8d}  {s['max_over_mean']:8.2f}  "
                         f"{len(s['under_min_tokens'])}")
    return "\n".join(lines)

