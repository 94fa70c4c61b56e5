"""Calibration statistics per (layer, expert), accumulated as running sums.

Sums, never means: an expert that saw 0 tokens has all-zero statistics (no NaN), and two
captures add up exactly. Saved as safetensors (tensors) + JSON (metadata); no pickles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..records import save_tensors_atomic, write_json_atomic
from ..registry import STATISTICS

# Per output channel of each projection, and per intermediate neuron (SwiGLU output h = act(g) * u):
#   sq = sum y^2, abs = sum |y|, wsq = sum r*y^2, wabs = sum r*|y|, with r the token's router weight.
# A metric may ask for more (dynamo.registry.register_statistic): a capture made for it keeps those too.
CHANNEL_STATS = ("sq", "abs", "wsq", "wabs")
CHANNEL_UNITS = ("gate", "up", "down", "neuron", "input")  # input: the tokens x (Wanda's ||x_j||)


@dataclass
class ExpertGroupStats:
    """Statistics of n experts with the same shapes (a layer's routed experts, or its shared expert, n=1)."""

    tokens: torch.Tensor                      # [n] int64: tokens routed to each expert
    router_weight_sum: torch.Tensor           # [n] float64
    channels: dict[str, dict[str, torch.Tensor]]  # unit -> stat -> [n, channels]
    hessian_in: torch.Tensor | None = None    # [n, H, H]: sum of x x^T over routed tokens (gate and up input)
    hessian_mid: torch.Tensor | None = None   # [n, I, I]: the same for the down projection's input
    extra: tuple[str, ...] = ()               # registered statistics kept beside CHANNEL_STATS, in channels

    @classmethod
    def zeros(cls, n: int, hidden: int, inter: int, hessians: bool, device, dtype=torch.float32,
              extra: tuple[str, ...] = ()):
        width = {"gate": inter, "up": inter, "neuron": inter, "down": hidden, "input": hidden}
        return cls(
            tokens=torch.zeros(n, dtype=torch.int64, device=device),
            router_weight_sum=torch.zeros(n, dtype=torch.float64, device=device),
            channels={u: {s: torch.zeros(n, width[u], dtype=dtype, device=device) for s in (*CHANNEL_STATS, *extra)}
                      for u in CHANNEL_UNITS},
            hessian_in=torch.zeros(n, hidden, hidden, dtype=dtype, device=device) if hessians else None,
            hessian_mid=torch.zeros(n, inter, inter, dtype=dtype, device=device) if hessians else None,
            extra=tuple(extra),
        )

    def add(self, e: int, x: torch.Tensor, r: torch.Tensor, outputs: dict[str, torch.Tensor],
            hessian_weights: torch.Tensor | None, count_tokens: bool = True) -> None:
        """Accumulate expert e's routed tokens x [m, H], router weights r [m], and its outputs."""
        if count_tokens:
            self.tokens[e] += x.shape[0]
            self.router_weight_sum[e] += r.double().sum()
        acc = self.channels["gate"]["sq"].dtype
        r = r.to(acc)
        outputs = {**outputs, "input": x}
        # Every unit's plain and router-weighted column sums in one matrix product:
        # [1; r] (2 x m) @ [y^2 | |y|] (m x 2C) -> [sq | abs] and [wsq | wabs].
        y = torch.cat([outputs[u].to(acc) for u in CHANNEL_UNITS], dim=1)
        sums = torch.stack([torch.ones_like(r), r]) @ torch.cat([y.square(), y.abs()], dim=1)
        start, width = 0, y.shape[1]
        for unit in CHANNEL_UNITS:
            n = outputs[unit].shape[1]
            stats = self.channels[unit]
            stats["sq"][e] += sums[0, start:start + n]
            stats["abs"][e] += sums[0, width + start:width + start + n]
            stats["wsq"][e] += sums[1, start:start + n]
            stats["wabs"][e] += sums[1, width + start:width + start + n]
            start += n
        for name in self.extra:  # apart from the product above, so the built-in sums stay bit for bit
            stat = STATISTICS.get(name)
            extra = (r if stat.weighted else torch.ones_like(r)) @ stat.transform(y)
            start = 0
            for unit in CHANNEL_UNITS:
                n = outputs[unit].shape[1]
                self.channels[unit][name][e] += extra[start:start + n]
                start += n
        if self.hessian_in is not None:
            xs, hs = x.to(acc), outputs["neuron"].to(acc)
            if hessian_weights is not None:
                scale = hessian_weights.to(acc).sqrt()[:, None]
                xs, hs = xs * scale, hs * scale
            self.hessian_in[e].addmm_(xs.T, xs)  # in place: no [H, H] temporary per expert and batch
            self.hessian_mid[e].addmm_(hs.T, hs)

    def replace(self, e: int, other: "ExpertGroupStats") -> None:
        """Take expert e's channel statistics and Hessians from `other` (route_all), keeping its counts."""
        for unit in CHANNEL_UNITS:
            for stat in (*CHANNEL_STATS, *self.extra):
                self.channels[unit][stat][e] = other.channels[unit][stat][e]
        if self.hessian_in is not None:
            self.hessian_in[e] = other.hessian_in[e]
            self.hessian_mid[e] = other.hessian_mid[e]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.tokens": self.tokens, f"{prefix}.router_weight_sum": self.router_weight_sum}
        for unit, stats in self.channels.items():
            out.update({f"{prefix}.channels.{unit}.{s}": t for s, t in stats.items()})
        if self.hessian_in is not None:
            out.update({f"{prefix}.hessian_in": self.hessian_in, f"{prefix}.hessian_mid": self.hessian_mid})
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str) -> "ExpertGroupStats":
        first = f"{prefix}.channels.{CHANNEL_UNITS[0]}."
        extra = tuple(sorted(k[len(first):] for k in t if k.startswith(first) and k[len(first):] not in CHANNEL_STATS))
        return cls(tokens=t[f"{prefix}.tokens"], router_weight_sum=t[f"{prefix}.router_weight_sum"],
                   channels={u: {s: t[f"{prefix}.channels.{u}.{s}"] for s in (*CHANNEL_STATS, *extra)}
                             for u in CHANNEL_UNITS},
                   hessian_in=t.get(f"{prefix}.hessian_in"), hessian_mid=t.get(f"{prefix}.hessian_mid"), extra=extra)


@dataclass
class LayerStats:
    layer: int
    routed: ExpertGroupStats
    shared: ExpertGroupStats | None = None


@dataclass
class CalibrationStats:
    """What one calibration pass saw: per MoE layer, routed (and shared) expert statistics."""

    layers: dict[int, LayerStats]
    windows: int
    seqlen: int
    hessian_weighting: str                      # "none" or "router"
    route_all: list[tuple[int, int]] = field(default_factory=list)    # experts whose stats saw every token
    rtn_fallback: list[tuple[int, int]] = field(default_factory=list)  # experts to quantize with RTN
    min_tokens: int = 0

    def under_covered(self, min_tokens: int) -> list[tuple[int, int]]:
        return [(i, e) for i in sorted(self.layers) for e, n in enumerate(self.layers[i].routed.tokens.tolist())
                if n < min_tokens]

    def save(self, path: Path) -> None:
        """path.safetensors + path.json (written atomically)."""
        path = Path(path)
        tensors = {}
        for i, layer in self.layers.items():
            tensors.update(layer.routed.tensors(f"layers.{i}.routed"))
            if layer.shared is not None:
                tensors.update(layer.shared.tensors(f"layers.{i}.shared"))
        save_tensors_atomic(path.with_suffix(".safetensors"), tensors)
        write_json_atomic(path.with_suffix(".json"), {
            "schema_version": 1, "layers": sorted(self.layers), "windows": self.windows, "seqlen": self.seqlen,
            "hessian_weighting": self.hessian_weighting, "min_tokens": self.min_tokens,
            "route_all": self.route_all, "rtn_fallback": self.rtn_fallback,
            "shared": [i for i, layer in self.layers.items() if layer.shared is not None]})

    @classmethod
    def load(cls, path: Path) -> "CalibrationStats":
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        t = load_file(str(path.with_suffix(".safetensors")))
        layers = {i: LayerStats(layer=i, routed=ExpertGroupStats.from_tensors(t, f"layers.{i}.routed"),
                                shared=ExpertGroupStats.from_tensors(t, f"layers.{i}.shared")
                                if i in meta["shared"] else None) for i in meta["layers"]}
        return cls(layers=layers, windows=meta["windows"], seqlen=meta["seqlen"],
                   hessian_weighting=meta["hessian_weighting"], min_tokens=meta["min_tokens"],
                   route_all=[tuple(x) for x in meta["route_all"]],
                   rtn_fallback=[tuple(x) for x in meta["rtn_fallback"]])
