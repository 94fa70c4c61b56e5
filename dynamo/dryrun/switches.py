"""The adaptive switches of a dry run's record, summarised per switch and per MoE layer (scripts/dryrun.py
and the depth check read them)."""

from __future__ import annotations


def switch_summary(switching: dict, n_moe: int, stage_rss: dict | None) -> dict | None:
    """The adaptive switches of a dry run's record: each one's seconds per part and the bytes it held (one MoE
    layer's statistics and candidates at a time), per MoE layer; its peak RSS is the evaluation stage's
    ("eval_ppl": the switch per dataset, then that dataset's few windows)."""
    switches = switching.get("switches") or {}
    if switching.get("policy") != "adaptive" or not switches:
        return None
    each = {}
    for name, r in switches.items():
        each[name] = {"profile_s": round(r["profile_s"], 3), "select_s": round(r["select_s"], 3),
                      "write_s": round(r["write_s"], 3), "total_s": round(r["total_s"], 3),
                      "select_write_over_profile": round((r["select_s"] + r["write_s"]) / r["profile_s"], 3)
                      if r["profile_s"] > 0 else None,
                      "held_nbytes_peak": r.get("held_nbytes_peak"),
                      "held_nbytes_by_layer": r.get("held_nbytes_by_layer")}
    mean = lambda key: sum(v[key] for v in each.values()) / len(each)  # noqa: E731
    return {"switches": each, "held_nbytes_peak": max(v["held_nbytes_peak"] or 0 for v in each.values()),
            "master_location": switching.get("master_location"), "master_nbytes": switching.get("master_nbytes"),
            "budget_nbytes": switching.get("budget_nbytes"),
            "per_moe_layer_s": {p: round(mean(p) / n_moe, 4) for p in ("profile_s", "select_s", "write_s")},
            "peak_rss_gib": (stage_rss or {}).get("eval_ppl"),
            "peak_rss_gib_before": (stage_rss or {}).get("eval_ppl_bq"),
            "rss_note": "peak_rss_gib: the 'eval_ppl' stage (each dataset's switch, then its windows); "
                        "peak_rss_gib_before: the BQ evaluation just before it (no switch)"}
