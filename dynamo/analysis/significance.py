"""Multi-level significance (spec Step 1): channels -> experts -> cross-dataset dynamics.

Input: one routed capture per dataset (dynamo.calibration, no Hessians needed). Output: a
`Significance` holding, per dataset, the channel significance S_ch of every
(layer, expert, unit, channel) and the expert significance S_exp of paper Eq. 1, plus what
changes across datasets. Metrics (`analysis.channel_metric`): dynamo.registry.METRICS, the
built-in ones in dynamo/analysis/metrics.py (act_l2, act_abs, wanda, freq).
Units (`analysis.channel_unit`): `row`, an output row of each projection (gate, up, down);
`neuron`, an intermediate neuron (gate row c, up row c and down column c together).
Eq. 1 sums S_ch over all of an expert's channels (every unit) and divides by the layer's total.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..adapters import MoELayer
from ..calibration import CalibrationStats
from ..calibration.stats import CHANNEL_STATS
from ..records import save_tensors_atomic, write_json_atomic
from ..registry import METRICS

UNITS = {"row": ("gate", "up", "down"), "neuron": ("neuron",)}
SCHEMA_VERSION = 1


def statistics_for(metric: str) -> tuple[str, ...]:
    """The registered channel statistic a capture must keep for `metric`, beyond the built-in ones."""
    statistic = METRICS.get(metric).statistic
    return (statistic,) if statistic and statistic not in CHANNEL_STATS else ()


def channel_significance(stats: CalibrationStats, layers: list[MoELayer], metric: str,
                         unit: str) -> dict[int, dict[str, torch.Tensor]]:
    """layer -> unit name -> S_ch [n_experts, channels] (float64) for one dataset's capture."""
    fn = METRICS.get(metric).fn
    if unit not in UNITS:
        raise ValueError(f"unknown channel unit '{unit}'; choose one of {', '.join(UNITS)}")
    out = {}
    for layer in layers:
        routed = stats.layers[layer.index].routed
        per_unit = {}
        for name in UNITS[unit]:
            per_unit[name] = fn(layer, routed, name).double().cpu()
        out[layer.index] = per_unit
    return out


def expert_shares(channels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Paper Eq. 1 for one layer: each expert's share of the layer's summed channel significance."""
    per_expert = sum(t.sum(dim=1) for t in channels.values())
    total = per_expert.sum()
    return per_expert / total if total > 0 else torch.full_like(per_expert, 1 / len(per_expert))


def _within_expert(t: torch.Tensor) -> torch.Tensor:
    """Each channel's share of its expert's significance in one unit: [E, C], rows sum to 1 (or 0)."""
    total = t.sum(dim=1, keepdim=True)
    return torch.where(total > 0, t / total.clamp(min=torch.finfo(t.dtype).tiny), torch.zeros_like(t))


@dataclass
class Significance:
    """Per-dataset channel and expert significance of one model, and their cross-dataset dynamics."""

    metric: str
    unit: str
    datasets: list[str]
    channels: dict[str, dict[int, dict[str, torch.Tensor]]]   # dataset -> layer -> unit -> [E, C]
    tokens: dict[str, dict[int, torch.Tensor]]                 # dataset -> layer -> [E] routed tokens
    router_weight: dict[str, dict[int, torch.Tensor]]          # dataset -> layer -> [E] router-weight sum
    meta: dict = field(default_factory=dict)                   # provenance: model, windows, seqlen, cache keys

    @classmethod
    def from_captures(cls, captures: dict[str, CalibrationStats], layers: list[MoELayer], metric: str,
                      unit: str, meta: dict | None = None) -> "Significance":
        return cls(metric=metric, unit=unit, datasets=list(captures),
                   channels={d: channel_significance(s, layers, metric, unit) for d, s in captures.items()},
                   tokens={d: {i: ls.routed.tokens.cpu() for i, ls in s.layers.items()} for d, s in captures.items()},
                   router_weight={d: {i: ls.routed.router_weight_sum.double().cpu() for i, ls in s.layers.items()}
                                  for d, s in captures.items()},
                   meta=dict(meta or {}))

    @property
    def layers(self) -> list[int]:
        return sorted(self.channels[self.datasets[0]])

    def expert(self, dataset: str) -> dict[int, torch.Tensor]:
        """S_exp (Eq. 1) per layer for one dataset: [E], sums to 1."""
        return {i: expert_shares(units) for i, units in self.channels[dataset].items()}

    def expert_matrix(self, layer: int, datasets: list[str] | None = None) -> torch.Tensor:
        """[datasets, E]: the per-dataset S_exp of one layer, the input of the fusion (Eq. 2)."""
        return torch.stack([expert_shares(self.channels[d][layer]) for d in (datasets or self.datasets)])

    def expert_change(self) -> dict[int, torch.Tensor]:
        """Per layer, each expert's cross-dataset change: the std over datasets of its S_exp."""
        return {i: self.expert_matrix(i).std(dim=0, unbiased=False) for i in self.layers}

    def dynamic_channels(self, frac: float) -> dict[int, dict[str, torch.Tensor]]:
        """Per layer and unit, [E, k] channel indices: the k = max(1, round(frac * C)) channels of each
        expert whose within-expert share varies most (std over datasets). With one dataset nothing
        varies: the k channels with the largest share of that dataset are cached instead (the ones a
        switch is most likely to need at full precision)."""
        if not 0 < frac <= 1:
            raise ValueError(f"dynamic_channel_frac must be in (0, 1], got {frac}")
        out = {}
        for i in self.layers:
            out[i] = {}
            for unit in self.channels[self.datasets[0]][i]:
                shares = torch.stack([_within_expert(self.channels[d][i][unit]) for d in self.datasets])
                score = shares.std(dim=0, unbiased=False) if len(self.datasets) > 1 else shares[0]  # [E, C]
                k = max(1, round(frac * score.shape[1]))
                # stable: equal scores keep the lower channel index first
                order = torch.sort(score, dim=1, descending=True, stable=True).indices
                out[i][unit] = order[:, :k].contiguous()
        return out

    def summary(self) -> dict:
        """Small enough for the run record: per dataset and layer, the largest expert share."""
        return {"metric": self.metric, "unit": self.unit, "datasets": self.datasets,
                "max_expert_share": {d: {str(i): round(float(s.max()), 4) for i, s in self.expert(d).items()}
                                     for d in self.datasets},
                "mean_expert_change": round(float(torch.cat(list(self.expert_change().values())).mean()), 6)}

    def save(self, path: Path) -> None:
        """path.safetensors (tensors) + path.json (metadata): no pickles."""
        path = Path(path)
        tensors = {}
        for d in self.datasets:
            for i, units in self.channels[d].items():
                for unit, t in units.items():
                    tensors[f"{d}/{i}/channels/{unit}"] = t
                tensors[f"{d}/{i}/tokens"] = self.tokens[d][i]
                tensors[f"{d}/{i}/router_weight"] = self.router_weight[d][i]
        save_tensors_atomic(path.with_suffix(".safetensors"), tensors)
        write_json_atomic(path.with_suffix(".json"), {
            "schema_version": SCHEMA_VERSION, "metric": self.metric, "unit": self.unit, "datasets": self.datasets,
            "layers": self.layers, "units": UNITS[self.unit], "meta": self.meta})

    @classmethod
    def load(cls, path: Path) -> "Significance":
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{path}: significance schema {meta.get('schema_version')}, expected {SCHEMA_VERSION}")
        t = load_file(str(path.with_suffix(".safetensors")))
        ds, layers = meta["datasets"], meta["layers"]
        return cls(metric=meta["metric"], unit=meta["unit"], datasets=ds,
                   channels={d: {i: {u: t[f"{d}/{i}/channels/{u}"] for u in meta["units"]} for i in layers}
                             for d in ds},
                   tokens={d: {i: t[f"{d}/{i}/tokens"] for i in layers} for d in ds},
                   router_weight={d: {i: t[f"{d}/{i}/router_weight"] for i in layers} for d in ds},
                   meta=meta["meta"])
