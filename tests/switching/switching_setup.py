"""A tiny BQ-quantized MoE with known-dataset significance, a channel cache and a switcher.

The two known "datasets" use disjoint halves of the vocabulary. To make their routing differ
strongly (a random tiny model routes two random token sets much alike), the embeddings of the
two halves are pushed apart along one direction: +u for the lower half, -u for the upper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from dynamo.adapters import moe_layers
from dynamo.analysis import Significance
from dynamo.calibration import capture
from dynamo.config import AllocationConfig
from dynamo.quant import QSpec, QuantPlan, apply_plan
from dynamo.quant.allocation import allocate
from dynamo.switching import ChannelCache, DynamicSwitcher
from tiny_families import HIDDEN, VOCAB, build

LOW, HIGH = (0, VOCAB // 2), (VOCAB // 2, VOCAB)   # the two halves of the vocabulary
GROUP = 8                                          # gate/up rows hold 2 groups, down rows 1
FRAC = 0.25                                        # gate/up: 2 of 8 rows, down: 4 of 16 rows per expert
WIDTHS = {"budget": [8, 6, 4, 3, 2], "fcm": [8, 6, 4, 2]}


def separated(family: str, scale: float = 1.0):
    model = build(family)
    with torch.no_grad():
        u = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1))
        emb = model.get_input_embeddings().weight
        emb[:VOCAB // 2] += scale * u / u.norm()
        emb[VOCAB // 2:] -= scale * u / u.norm()
    return model


def tokens(span: tuple[int, int], n: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(span[0], span[1], (n, seqlen), generator=torch.Generator().manual_seed(seed))


def allocation_config(method: str, target_bits: float = 3.5):
    return OmegaConf.merge(OmegaConf.structured(AllocationConfig),
                           {"method": method, "target_bits": target_bits, "widths": WIDTHS[method]})


@dataclass
class Setup:
    model: torch.nn.Module
    significance: Significance
    cache: ChannelCache
    plan: QuantPlan
    allocation: object
    fp16_state: dict
    codes: dict | None = None   # QuantReport.codes, with keep_codes=True


def quantized(family: str, *, unit: str = "row", method: str = "budget", target_bits: float = 3.5,
              keep_codes: bool = False) -> Setup:
    """FP16 model -> significance on the two halves -> cache -> BQ (RTN, DynaMo allocation) applied."""
    model = separated(family)
    layers = list(moe_layers(model))
    captures = {"low": capture(model, tokens(LOW, 3, 12, 0), hessians=False),
                "high": capture(model, tokens(HIGH, 3, 12, 1), hessians=False)}
    sig = Significance.from_captures(captures, layers, "act_l2", unit)
    cfg = allocation_config(method, target_bits)
    cache = ChannelCache.build(model, sig, FRAC, widths=WIDTHS[method], group_size=GROUP)
    fp16_state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = QuantPlan(method="rtn", default=QSpec(16, group_size=GROUP), shared_default=8)
    allocate(plan, layers, cfg, significance=sig)
    report = apply_plan(model, plan, keep_codes=keep_codes)
    return Setup(model, sig, cache, plan, cfg, fp16_state, report.codes if keep_codes else None)


def switcher(s: Setup, **kwargs) -> DynamicSwitcher:
    return DynamicSwitcher(s.model, s.plan, s.significance, s.cache, s.allocation, **kwargs)


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits
