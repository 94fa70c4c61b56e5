"""Tables and the figure of scripts/dqs_compare.py, from its JSON record (no measuring here).

The record's `domains_report[d]` holds `bq`, `policies[name][budget key]` (a row of dqs.Bench.measure_switch)
and `gptq_ceiling`. Means over domains are plain means of the per-domain estimates (each with its own CI in
the per-domain table); "not significant" marks a CI that covers 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .dqs import SPLITS, fmt, significant

FIXED = "fixed"  # the budget key of a policy whose bytes are not a budget (the paper's offline cache)


def budget_key(budget: float | None) -> str:
    return FIXED if budget is None else f"{budget:g}"


def _bytes(summary: dict, name: str, row: dict) -> int:
    return row["switch"].get("extra_nbytes", summary["paper_cache_nbytes"] if name == "paper" else 0)


def summarize(summary: dict) -> dict:
    """Per policy and budget: means over the novel domains (calib, test, bytes, realized / expected), the ceiling's,
    and per budget the adaptive policy with the best calib mean (the choice, made on calib windows only)."""
    report, novel = summary["domains_report"], summary["novel"] or summary["domains"]
    means: dict = {}
    for name in report[novel[0]]["policies"]:
        for key in report[novel[0]]["policies"][name]:
            rows = [report[d]["policies"][name][key] for d in novel]
            ratios = [r["realized"]["over_expected"] for r in rows if r.get("realized", {}).get("over_expected")]
            means.setdefault(name, {})[key] = {
                **{s: float(np.mean([r[s]["damage_removed"]["estimate"] for r in rows])) for s in SPLITS},
                "bytes": float(np.mean([_bytes(summary, name, r) for r in rows])),
                "switch_s": float(np.mean([r["switch"]["total_s"] for r in rows])),
                "realized": float(np.mean([r["realized"]["removed"] for r in rows])),
                "realized_over_expected": float(np.mean(ratios)) if ratios else None}
    out = {"over": novel, "means": means}
    if "gptq_ceiling" in report[novel[0]]:
        out["gptq_ceiling"] = {s: float(np.mean([report[d]["gptq_ceiling"][s]["damage_removed"]["estimate"]
                                                 for d in novel])) for s in SPLITS}
    keys = sorted({k for name in means for k in means[name] if k != FIXED}, key=float)
    out["choice_on_calib"] = {k: max((n for n in means if k in means[n]), key=lambda n: means[n][k]["calib"])
                              for k in keys}
    return out


def _ci(iv: dict) -> str:
    return fmt(iv) + ("" if significant(iv) else " not significant")


def _num(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown(summary: dict) -> str:
    s = summary["summary"]
    lines = [f"# DQS compared at equal bytes on {summary['model']} ({summary['quant']}): share of BQ's KL damage removed",
             "", f"Regenerate: `{summary['command']}` ({summary['wall_s']} s, {summary['threads']} threads).", "",
             f"Budgets: fractions of the routed experts' {summary['expert_fp16_nbytes']} FP16 bytes; the paper's cache "
             f"is fixed offline ({summary['paper_cache_nbytes']} bytes). Known domains {summary['known']}, novel "
             f"{summary['novel']}. Windows: {summary['protocol']['test_windows']} test, "
             f"{summary['protocol']['calib_eval_windows']} held-out calib per domain; the switch profiles the first "
             f"{summary['protocol']['profile_windows']} calib windows; the GPTQ ceiling re-quantizes every expert on "
             f"{summary['protocol']['fit_windows']} calib windows of the domain (never the held-out ones) at BQ's bits.",
             "realized = share of the routed experts' output error (router-weighted, vs FP16) removed on the held-out "
             "calib windows; realized / estimated divides it by the switch's expected_reduction.", ""]
    if not summary.get("complete", True):
        lines += [f"**Partial: {len(summary['domains'])} of the {len(summary['planned_domains'])} planned domains "
                  f"({summary['planned_domains']}) measured; the run was stopped.**", ""]
    if summary["quick"]:
        lines += ["**--quick: a smoke test on a few windows, not a result.**", ""]
    for name, why in summary["skipped"].items():
        lines.append(f"- policy `{name}` skipped: {why}")
    lines += ["", f"## Mean over {', '.join(s['over'])}", "",
              "| policy | budget | KL removed, test | KL removed, calib | bytes | realized | realized / estimated | switch s |",
              "|---|---|---|---|---|---|---|---|"]
    for name, by_key in s["means"].items():
        for key, m in by_key.items():
            lines.append(f"| {name} | {key} | {100 * m['test']:+.1f}% | {100 * m['calib']:+.1f}% | {m['bytes']:.0f} | "
                         f"{100 * m['realized']:+.1f}% | {_num(m['realized_over_expected'], '.2f')} | {m['switch_s']:.2f} |")
    if "gptq_ceiling" in s:
        c = s["gptq_ceiling"]
        lines.append(f"| GPTQ on the domain (ceiling) | every expert | {100 * c['test']:+.1f}% | {100 * c['calib']:+.1f}% "
                     "| 0 (re-quantized) | | | |")
    lines += ["", "Choice on calib (best mean of the adaptive policies per budget): "
              + ", ".join(f"{k}: **{n}**" for k, n in s["choice_on_calib"].items()), "", "## Per domain", "",
              "| domain | policy | budget | KL removed, test (95% CI) | KL removed, calib (95% CI) | PPL / BQ, test | "
              "top-1 | bytes | switch s | realized | realized / estimated |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for d, rows in summary["domains_report"].items():
        bq = rows["bq"]["test"]
        lines.append(f"| {d} | BQ | | KL {bq['kl']:.5f} | | PPL {bq['ppl']:.3f} (FP16 {bq['ppl_fp16']:.3f}) | "
                     f"{bq['top1_agree']:.4f} | | | | |")
        entries = [(name, key, row) for name, by_key in rows["policies"].items() for key, row in by_key.items()]
        if "gptq_ceiling" in rows:
            entries.append(("GPTQ ceiling", "", rows["gptq_ceiling"]))
        for name, key, row in entries:
            t, c, sw, real = row["test"], row["calib"], row.get("switch", {}), row.get("realized", {})
            nbytes = _bytes(summary, name, row) if "switch" in row else 0
            seconds = sw.get("total_s", row.get("requant", {}).get("seconds"))
            lines.append(f"| {d} | {name} | {key} | {_ci(t['damage_removed'])} | {_ci(c['damage_removed'])} | "
                         f"{fmt(t['ppl_ratio_to_bq'], False)} | {t['top1_agree']:.4f} | {nbytes} | "
                         f"{_num(seconds, '.2f')} | {_num(real.get('removed'), '+.3f')} | "
                         f"{_num(real.get('over_expected'), '.2f')} |")
    return "\n".join(lines) + "\n"


def figure(summary: dict, path: Path) -> str:
    """KL removed on test against bytes, mean over the novel domains, one line per kind. Returns what was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no figure: matplotlib is not installed ({path} not written)"
    s = summary["summary"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, by_key in s["means"].items():
        points = sorted((m["bytes"], 100 * m["test"]) for m in by_key.values())
        ax.plot(*zip(*points), marker="o", linestyle="-" if len(points) > 1 else "none", label=name)
    if "gptq_ceiling" in s:
        ax.axhline(100 * s["gptq_ceiling"]["test"], color="black", linestyle="--", label="GPTQ on the domain (ceiling)")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("device bytes of the switch")
    ax.set_ylabel("BQ's KL damage removed, test (%)")
    ax.set_title(f"{summary['model']}: mean over {', '.join(s['over'])}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"figure: {path}"
