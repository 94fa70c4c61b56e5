"""The PPL-vs-bits (Pareto) figure of every method on the embedded models."""

from __future__ import annotations

import math
from pathlib import Path

from .records import MODELS, pick


def write_pareto(records: list[dict], out: Path) -> list[Path]:
    """PPL (geometric mean over known, and over novel, domains) against average expert bits, one point
    per quant preset of the embedded sweeps; DynaMo runs add their BQ-only point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen, written = pick(records, ("baselines_embedded", "dynamo_embedded")), []
    for model in MODELS:
        points = {}
        for (m, quant), r in sorted(chosen.items()):
            bits = r["metrics"].get("avg_bits", {}).get("experts")
            if m != model or bits is None or quant.startswith("bnb_int8"):
                continue
            known = r["dataset"]["known"]
            for label, key in ((quant, "ppl"), (f"{quant} (BQ)", "ppl_bq")):
                ppl = r["metrics"].get(key)
                if ppl:
                    geo = lambda names: math.exp(sum(math.log(ppl[d]) for d in names) / len(names))  # noqa: E731
                    points[label] = (bits, geo(known), geo([d for d in ppl if d not in known]))
        if not points:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, k, title in ((axes[0], 1, "known domains"), (axes[1], 2, "novel domains")):
            for label, p in sorted(points.items()):
                marker = "*" if label.startswith("dynamo") else "o"
                ax.scatter(p[0], p[k], marker=marker, s=60 if marker == "*" else 25)
                ax.annotate(label, (p[0], p[k]), fontsize=6, xytext=(3, 2), textcoords="offset points")
            ax.set_xlabel("average bits per routed-expert weight (scales/zeros counted)")
            ax.set_ylabel("PPL, geometric mean")
            ax.set_title(f"{model}: {title}", fontsize=9)
        path = out / f"pareto_{model}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        written.append(path)
    return written
