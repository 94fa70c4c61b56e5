"""run_stream: serve a stream of datasets batch by batch, switching when the routing shifts.

Segments (dataset name, windows [N, T]) are fed in order, `batch_size` windows at a time. Each
batch is scored (next-token loss) and its routed expert counts go to the detector; when the
detector fires, the switcher profiles the windows of the last `detector.window` batches
(`switch_to`), so the switch applies from the next batch on. Per segment the report gives
token perplexity (mean loss over its predicted tokens, no context across windows: the
protocol of dynamo.eval.perplexity), its switch events, and the detection latency: batches
from the segment's start to its first switch.

Routing is observed through dynamo.adapters.expert_compute, which runs every family's routed
experts through the reference computation (`routed_forward`) and sees each token's top-k
expert ids: family-agnostic, at the price of the model's fused expert kernels (equal outputs
up to float rounding).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..adapters import expert_compute
from ..adapters.compute import routed_forward
from ..errors import UserError
from .detector import Counts, RoutingShiftDetector


@torch.no_grad()
def forward_with_routing(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, Counts]:
    """Logits of one batch and, per MoE layer, how many token slots each expert was routed. The experts
    compute as the model holds them: dense weights, or its attached packed layers (with their slot tables)."""
    from dynamo_kernels.dispatch import moe_experts

    from ..packed.model import attached_packed

    counts: Counts = {}

    def count_then_compute(layer, hidden, top_k_index, top_k_weights):
        ids = top_k_index[(top_k_index >= 0) & (top_k_index < layer.n_experts)]  # padding slots dropped
        c = torch.bincount(ids.flatten().long(), minlength=layer.n_experts).cpu()
        counts[layer.index] = counts[layer.index] + c if layer.index in counts else c
        packed = attached_packed(layer)
        if packed is not None:
            return moe_experts(packed.experts(), hidden, top_k_index, top_k_weights)
        return routed_forward(layer, hidden, top_k_index, top_k_weights)

    device = model.get_input_embeddings().weight.device
    with expert_compute(model, count_then_compute):
        logits = model(input_ids=input_ids.to(device), use_cache=False).logits
    return logits, counts


@dataclass
class SwitchEvent:
    batch: int              # global batch index: the switch applies from batch + 1
    segment: int
    dataset: str
    jsd: float
    switch: dict | None     # the SwitchReport (to_dict), None when no switcher was given


@dataclass
class SegmentResult:
    dataset: str
    first_batch: int
    batches: int
    predicted_tokens: int
    nll: float
    ppl: float
    switches: list[int] = field(default_factory=list)   # global batch indices of the switches inside it
    latency: int | None = None                          # batches from the segment start to its first switch


@dataclass
class StreamReport:
    segments: list[SegmentResult]
    events: list[SwitchEvent]
    jsd: list[float | None]                             # the detector's value after every batch
    serve_s: float = 0.0                                # seconds serving batches (forward, routing counts, loss)
    switch_s: float = 0.0                               # seconds in switches

    @property
    def switch_share(self) -> float:
        """Switches' share of the stream's online time (the paper: 7.7-10.7%)."""
        total = self.serve_s + self.switch_s
        return self.switch_s / total if total > 0 else 0.0

    def to_dict(self) -> dict:
        return {"segments": [asdict(s) for s in self.segments], "events": [asdict(e) for e in self.events],
                "jsd": self.jsd, "serve_s": round(self.serve_s, 4), "switch_s": round(self.switch_s, 4),
                "switch_share": round(self.switch_share, 5)}


def _batch_loss(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device),
                           reduction="sum")
    return float(loss), ids[:, 1:].numel()


def run_stream(model, segments: list[tuple[str, torch.Tensor]], detector: RoutingShiftDetector, switcher=None, *,
               batch_size: int = 4, on_logits=None) -> StreamReport:
    """Feed the segments batch by batch; switch (if `switcher` is given) whenever the detector fires.
    `on_logits(segment index, first window index in the segment, logits)` sees every batch (the KL meter)."""
    if not segments:
        raise UserError("run_stream needs at least one (dataset, windows) segment")
    for name, windows in segments:
        if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[0] == 0 \
                or windows.shape[1] < 2:
            shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
            raise UserError(f"segment '{name}': need a [windows, seqlen >= 2] tensor of token ids, got {shape}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    recent: deque[torch.Tensor] = deque(maxlen=detector.window)
    results, events, trace, b = [], [], [], 0
    serve_s = switch_s = 0.0
    for s, (name, windows) in enumerate(segments):
        nll, tokens, first = 0.0, 0, b
        result = SegmentResult(dataset=name, first_batch=first, batches=0, predicted_tokens=0, nll=0.0, ppl=0.0)
        for start in range(0, len(windows), batch_size):
            ids = windows[start:start + batch_size]
            t = time.perf_counter()
            logits, counts = forward_with_routing(model, ids)
            if on_logits is not None:
                on_logits(s, start, logits)
            loss, n = _batch_loss(logits, ids)
            nll, tokens = nll + loss, tokens + n
            recent.append(ids)
            step = detector.update(counts)
            trace.append(step.jsd)
            serve_s += time.perf_counter() - t
            if step.fired:
                t = time.perf_counter()
                report = switcher.switch_to(torch.cat(list(recent))) if switcher is not None else None
                switch_s += time.perf_counter() - t
                events.append(SwitchEvent(b, s, name, step.jsd, report.to_dict() if report is not None else None))
                result.switches.append(b)
                if result.latency is None:
                    result.latency = b - first
            b += 1
        mean = nll / tokens
        result.batches, result.predicted_tokens = b - first, tokens
        result.nll, result.ppl = mean, float(torch.tensor(mean).exp())
        results.append(result)
    return StreamReport(results, events, trace, serve_s, switch_s)
