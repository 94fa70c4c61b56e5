"""Figures of a DynaMo run, written into the run folder (and mirrored to W&B by the logger).

- significance.png: per-layer expert significance (Eq. 1) for each dataset, side by side
  (the paper's motivation figure: which experts matter depends on the data);
- expert_change.png: each expert's cross-dataset change (std of its share over datasets);
- bit_map.png: the width each routed expert got (layer x expert).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..records import atomic_path

FIGURES_DIR = "figures"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def _heatmap(ax, matrix: torch.Tensor, title: str, cmap: str, vmin=None, vmax=None, layers=None):
    image = ax.imshow(matrix.numpy(), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    if layers is not None:  # decoder-layer indices, not row numbers (dense layers are skipped)
        ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    return image


def write_figures(run_dir: Path, significance, bits: dict[int, list[int]] | None) -> list[Path]:
    """The three figures as PNG files under run_dir/figures; returns their paths."""
    plt = _pyplot()
    out_dir = Path(run_dir) / FIGURES_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = significance.layers
    written = []

    per_dataset = {d: torch.stack([significance.expert(d)[i] for i in layers]).float() for d in significance.datasets}
    vmax = max(float(m.max()) for m in per_dataset.values())
    fig, axes = plt.subplots(1, len(per_dataset), figsize=(3.2 * len(per_dataset) + 1, 3.2), squeeze=False)
    for k, (ax, (name, matrix)) in enumerate(zip(axes[0], per_dataset.items())):
        image = _heatmap(ax, matrix, f"{name}: expert share", "viridis", 0.0, vmax, layers)
        if k:
            ax.set_ylabel("")
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
    fig.suptitle(f"expert significance (Eq. 1, metric {significance.metric})", fontsize=10)
    written.append(_save(fig, plt, out_dir / "significance.png"))

    change = significance.expert_change()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    fig.colorbar(_heatmap(ax, torch.stack([change[i] for i in layers]).float(),
                          "cross-dataset change (std of share)", "magma", layers=layers), ax=ax)
    written.append(_save(fig, plt, out_dir / "expert_change.png"))

    if bits:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        matrix = torch.tensor([bits[i] for i in layers], dtype=torch.float32)
        fig.colorbar(_heatmap(ax, matrix, f"bits per expert (mean {float(matrix.mean()):.2f})", "cividis",
                              2, 8, layers), ax=ax)
        written.append(_save(fig, plt, out_dir / "bit_map.png"))
    return written


def _save(fig, plt, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
