"""What the decode and kernel benchmarks share: the mixed-width packed model they time, its resident bytes,
the agreement check against a reference, and the file-name slug of the device they ran on."""

from __future__ import annotations

import re

import torch

from ..config import SourceConfig
from ..data import load_documents
from ..eval.perplexity import make_windows, tokenize_corpus

MIXED_WIDTHS = (2, 3, 4)  # cycled over the experts: about 3.0 average code bits, as a DynaMo 3-bit budget gives
GROUP_SIZE = 128
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2}  # max relative error of a kernel against its reference


def domain_windows(tokenizer, source: SourceConfig, split: str, seqlen: int, n: int | None,
                   bos_id: int | None) -> torch.Tensor:
    """Up to n windows of one split of a dataset, tokenized as the harness does (BOS-led where bos_id is set)."""
    ids = tokenize_corpus(tokenizer, load_documents(source, split), source.separator)
    return make_windows(ids, seqlen, n, source.path, bos_id=bos_id)


def mixed_widths(n_experts: int) -> list[int]:
    return [MIXED_WIDTHS[e % len(MIXED_WIDTHS)] for e in range(n_experts)]


def pack_mixed(model) -> tuple[dict, object]:
    """RTN with expert e of every MoE layer at MIXED_WIDTHS[e % 3], group 128, packed per layer; and the plan."""
    from ..adapters import moe_layers
    from ..packed.model import pack_experts
    from ..quant import QSpec, QuantPlan, apply_plan

    plan = QuantPlan(method="rtn", default=QSpec(MIXED_WIDTHS[0], group_size=GROUP_SIZE))
    for layer in moe_layers(model):
        for expert, bits in enumerate(mixed_widths(layer.n_experts)):
            plan.set_expert_bits(layer.index, expert, bits)
    return pack_experts(model, apply_plan(model, plan, keep_codes=True).codes), plan


def param_bytes(model) -> int:
    """Bytes the model's parameters hold, at their own dtypes (packed codes count as stored)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
