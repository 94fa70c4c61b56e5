"""Tiny random MoE models of every adapted family, built offline in well under a second each.

`deepseek` is the DeepSeek-MoE-16B remote-code layout (no class in transformers): a minimal
stand-in with the same module names and the same `moe_infer(x, flat_idx, flat_weight)`
dispatch, enough to exercise the ModuleList adapter.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config, MixtralConfig, OlmoeConfig,
                          PretrainedConfig, Qwen2MoeConfig, Qwen3MoeConfig)
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutput

from dynamo.adapters import registered_adapters

VOCAB, HIDDEN, INTER, EXPERTS, TOP_K, LAYERS = 64, 16, 8, 4, 2, 3
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=TOP_K,
              pad_token_id=0, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
MLA = dict(kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=4)

CONFIGS = {
    "olmoe": lambda: OlmoeConfig(**COMMON, intermediate_size=INTER, num_experts=EXPERTS),
    # mlp_only_layers: layer 1 is dense, so layer indices of MoE blocks are 0 and 2
    "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, intermediate_size=2 * INTER, moe_intermediate_size=INTER,
                                        shared_expert_intermediate_size=2 * INTER, num_experts=EXPERTS,
                                        mlp_only_layers=[1]),
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, intermediate_size=2 * INTER, moe_intermediate_size=INTER,
                                        num_experts=EXPERTS, head_dim=8),
    "mixtral": lambda: MixtralConfig(**COMMON, intermediate_size=INTER, num_local_experts=EXPERTS),
    "deepseek_v2": lambda: DeepseekV2Config(**COMMON, **MLA, intermediate_size=2 * INTER, moe_intermediate_size=INTER,
                                            n_routed_experts=EXPERTS, n_shared_experts=1, first_k_dense_replace=1,
                                            n_group=1, topk_group=1),
    "deepseek_v3": lambda: DeepseekV3Config(**COMMON, **MLA, intermediate_size=2 * INTER, moe_intermediate_size=INTER,
                                            n_routed_experts=EXPERTS, n_shared_experts=1, first_k_dense_replace=1,
                                            n_group=1, topk_group=1),
}
# first MoE layer index and whether blocks have a shared expert
EXPECTED = {"olmoe": ([0, 1, 2], False), "qwen2_moe": ([0, 2], True), "qwen3_moe": ([0, 1, 2], False),
            "mixtral": ([0, 1, 2], False), "deepseek_v2": ([1, 2], True), "deepseek_v3": ([1, 2], True),
            "deepseek": ([1, 2], True)}
# Every supported family the adapter registry holds, so a new adapter without a tiny model above
# fails the adapter tests (tests/adapters/test_adapters.py) instead of going untested.
FAMILIES = sorted(t for t, adapter in registered_adapters().items() if adapter.refuse is None)


class _DeepseekConfig(PretrainedConfig):
    model_type = "deepseek"


class _MLP(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = ACT2FN["silu"]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _Gate(nn.Module):
    def __init__(self, hidden, experts, top_k):
        super().__init__()
        self.weight, self.top_k = nn.Parameter(torch.randn(experts, hidden) * 0.5), top_k

    def forward(self, x):
        scores = (x.reshape(-1, x.shape[-1]) @ self.weight.T).softmax(-1)
        weight, idx = scores.topk(self.top_k, dim=-1)
        return idx, weight, None


class _DeepseekMoE(nn.Module):
    def __init__(self, hidden, inter, experts, top_k):
        super().__init__()
        self.gate = _Gate(hidden, experts, top_k)
        self.experts = nn.ModuleList(_MLP(hidden, inter) for _ in range(experts))
        self.shared_experts = _MLP(hidden, 2 * inter)

    def forward(self, x):
        shape = x.shape
        idx, weight, _ = self.gate(x)
        y = self.moe_infer(x.view(-1, shape[-1]), idx.view(-1), weight.view(-1, 1)).view(*shape)
        return y + self.shared_experts(x)

    @torch.no_grad()
    def moe_infer(self, x, flat_idx, flat_weight):
        out = torch.zeros_like(x)
        k = flat_idx.numel() // x.shape[0]
        for e, expert in enumerate(self.experts):
            pos = (flat_idx == e).nonzero().flatten()
            if len(pos):
                out.index_add_(0, pos // k, expert(x[pos // k]) * flat_weight[pos])
        return out


class _Layer(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, hidden_states, **kwargs):
        return hidden_states + self.mlp(hidden_states)


class TinyDeepseekMoE(nn.Module):
    """The remote-code layout: model.layers[i].mlp, layer 0 dense."""

    def __init__(self):
        super().__init__()
        self.config = _DeepseekConfig(n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K, hidden_size=HIDDEN)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.model.layers = nn.ModuleList(
            [_Layer(_MLP(HIDDEN, 2 * INTER))] + [_Layer(_DeepseekMoE(HIDDEN, INTER, EXPERTS, TOP_K))
                                                 for _ in range(LAYERS - 1)])
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids, use_cache=False, **kwargs):
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h)
        return CausalLMOutput(logits=self.lm_head(h))


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if family == "deepseek":
        model = TinyDeepseekMoE()
    else:
        model = AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=torch.float32)
        with torch.no_grad():  # random init gives near-uniform routers; sharpen them so routing is uneven
            for name, p in model.named_parameters():
                if name.endswith(("gate.weight", "router.weight")) and p.dim() == 2 and p.shape[0] == EXPERTS:
                    p.normal_(0, 1.0)
    return model.eval()
