"""RoutingShiftDetector: when to switch (our addition; the paper switches once per dataset
change and does not say how a change is noticed).

Fed each batch's routed expert counts per MoE layer (dynamo.switching.stream.forward_with_routing
collects them), it keeps the last `window` batches and compares their per-layer expert frequency
distribution with a reference: the Jensen-Shannon divergence (base 2, so in [0, 1]) per layer,
averaged over layers. It fires when that mean exceeds `threshold` for `patience` consecutive
batches.

Hysteresis. On firing, the window restarts and the reference is re-measured: the first full
window after the switch becomes the new reference (the distribution the new configuration
serves). We measure it rather than take the window that fired: that window straddles the
change (it still holds batches from before it), and a reference half old, half new would make
a second fire inside the new segment likely. No fire is possible until the new reference is
measured and `cooldown` batches have passed since the last fire. The initial reference is
given (e.g. `known_reference(significance)`, the routing the known datasets produced) or, when
None, measured the same way from the stream's first full window.

Pure torch, deterministic: the same counts give the same decisions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

Counts = dict[int, torch.Tensor]  # MoE layer index -> [n_experts] routed-token counts


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in bits between two count (or probability) vectors."""
    p, q = p.double(), q.double()
    if p.shape != q.shape or p.dim() != 1:
        raise ValueError(f"JSD needs two vectors of the same length, got {tuple(p.shape)} and {tuple(q.shape)}")
    if bool((p < 0).any() or (q < 0).any()) or float(p.sum()) <= 0 or float(q.sum()) <= 0:
        raise ValueError("JSD needs non-negative counts with a positive total")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> torch.Tensor:  # 0 * log 0 = 0
        mask = a > 0
        return (a[mask] * torch.log2(a[mask] / m[mask])).sum()

    return float(((kl(p) + kl(q)) / 2).clamp(0.0, 1.0))


def mean_jsd(counts: Counts, reference: Counts) -> float:
    """JSD per layer, averaged over layers; both must name the same layers."""
    if sorted(counts) != sorted(reference):
        raise ValueError(f"counts name layers {sorted(counts)}, the reference {sorted(reference)}")
    return sum(js_divergence(counts[i], reference[i]) for i in counts) / len(counts)


def known_reference(significance) -> Counts:
    """The routing of the known datasets together: their routed-token counts summed per layer."""
    return {i: sum(significance.tokens[d][i].double() for d in significance.datasets) for i in significance.layers}


@dataclass
class DetectorStep:
    batch: int              # index of the batch just fed (0-based, over the detector's life)
    jsd: float | None       # mean JSD of the window against the reference; None while either is incomplete
    fired: bool


class RoutingShiftDetector:
    def __init__(self, window: int = 8, threshold: float = 0.1, patience: int = 2, cooldown: int = 16,
                 reference: Counts | None = None):
        if window < 1 or patience < 1 or cooldown < 0:
            raise ValueError(f"window and patience must be >= 1 and cooldown >= 0, got window={window}, "
                             f"patience={patience}, cooldown={cooldown}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold is a JSD in bits, in (0, 1); got {threshold}")
        self.window, self.threshold, self.patience, self.cooldown = window, threshold, patience, cooldown
        self.reference = None if reference is None else {i: c.double().clone() for i, c in reference.items()}
        self._recent: deque[Counts] = deque(maxlen=window)
        self._over = 0                   # consecutive batches above the threshold
        self._batch = -1
        self._last_fire: int | None = None

    def _window_counts(self) -> Counts:
        layers = self._recent[0].keys()
        return {i: sum(c[i].double() for c in self._recent) for i in layers}

    def update(self, counts: Counts) -> DetectorStep:
        """Feed one batch's counts; returns the window's JSD and whether to switch now."""
        if not counts:
            raise ValueError("routing counts name no MoE layer")
        counts = {i: torch.as_tensor(c).double().flatten().cpu() for i, c in counts.items()}
        if self._recent and sorted(counts) != sorted(self._recent[0]):
            raise ValueError(f"counts name layers {sorted(counts)}, earlier batches {sorted(self._recent[0])}")
        self._batch += 1
        self._recent.append(counts)
        if self.reference is None:
            if len(self._recent) == self.window:  # the reference is measured, not guessed
                self.reference = self._window_counts()
            return DetectorStep(self._batch, None, False)
        if len(self._recent) < self.window:  # only full windows are compared: a partial one is noisier
            return DetectorStep(self._batch, None, False)
        jsd = mean_jsd(self._window_counts(), self.reference)
        self._over = self._over + 1 if jsd > self.threshold else 0
        cooled = self._last_fire is None or self._batch - self._last_fire >= self.cooldown
        fired = self._over >= self.patience and cooled
        if fired:
            self._last_fire = self._batch
            self.restart()
        return DetectorStep(self._batch, jsd, fired)

    def restart(self, reference: Counts | None = None) -> None:
        """After a switch: the window restarts; the reference is `reference` or the next full window."""
        self._recent.clear()
        self._over = 0
        self.reference = None if reference is None else {i: c.double().clone() for i, c in reference.items()}
