"""DeepSeek-MoE-16B at its real shapes, as the project's ModuleList stand-in.

The checkpoint's own modelling code ships in its hub repository (remote code), which a dry run
neither has nor should execute. This module reproduces the layout the `deepseek` adapter reads
(tests/adapters/tiny_families.py is the tiny version): `model.layers[i].mlp`, dense first
`first_k_dense_replace` layers, an `nn.ModuleList` of SwiGLU experts, `shared_experts` of width
n_shared_experts * moe_intermediate_size, a softmax top-k gate and the `moe_infer(x, idx, weight)`
dispatch. Attention is Llama's (DeepSeek-MoE's is the same multi-head attention with RoPE), so
parameter counts and compute match the real model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, PretrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutput
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding


class DeepseekStandInConfig(PretrainedConfig):
    model_type = "deepseek"


class _MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, act: str):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _Gate(nn.Module):
    def __init__(self, hidden: int, experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden).normal_(0, 0.02))
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob

    def forward(self, x):
        scores = (x.reshape(-1, x.shape[-1]).float() @ self.weight.float().T).softmax(-1)
        weight, idx = scores.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weight = weight / weight.sum(-1, keepdim=True)
        return idx, weight.to(x.dtype), None


class DeepseekMoE(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        hidden, inter, act = c["hidden_size"], c["moe_intermediate_size"], c.get("hidden_act", "silu")
        self.gate = _Gate(hidden, c["n_routed_experts"], c["num_experts_per_tok"], c.get("norm_topk_prob", False))
        self.experts = nn.ModuleList(_MLP(hidden, inter, act) for _ in range(c["n_routed_experts"]))
        self.shared_experts = _MLP(hidden, c["n_shared_experts"] * inter, act)

    def forward(self, x):
        shape = x.shape
        idx, weight, _ = self.gate(x)
        y = self.moe_infer(x.view(-1, shape[-1]), idx.view(-1), weight.view(-1, 1)).view(*shape)
        return y + self.shared_experts(x)

    @torch.no_grad()
    def moe_infer(self, x, flat_idx, flat_weight):
        out = torch.zeros_like(x)
        k = flat_idx.numel() // x.shape[0]
        for e in flat_idx.unique().tolist():
            pos = (flat_idx == e).nonzero().flatten()
            out.index_add_(0, pos // k, self.experts[e](x[pos // k]) * flat_weight[pos])
        return out


class _Layer(nn.Module):
    def __init__(self, c: dict, attn_config: LlamaConfig, index: int, moe: bool):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(c["hidden_size"], eps=c["rms_norm_eps"])
        self.self_attn = LlamaAttention(attn_config, layer_idx=index)
        self.post_attention_layernorm = LlamaRMSNorm(c["hidden_size"], eps=c["rms_norm_eps"])
        self.mlp = DeepseekMoE(c) if moe else _MLP(c["hidden_size"], c["intermediate_size"], c.get("hidden_act", "silu"))

    def forward(self, hidden_states, position_embeddings=None, **kwargs):
        attn, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings=position_embeddings,
                                 attention_mask=None)
        h = hidden_states + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekStandIn(nn.Module):
    """`values`: the published config.json (assets/configs/deepseek-moe.json)."""

    def __init__(self, values: dict, layers: int | None = None, vocab_size: int | None = None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        c = {**values, "num_hidden_layers": layers or values["num_hidden_layers"],
             "vocab_size": vocab_size or values["vocab_size"]}
        c.pop("architectures", None)
        c.pop("model_type", None)
        self.config = DeepseekStandInConfig(**c)
        attn_config = LlamaConfig(hidden_size=c["hidden_size"], num_attention_heads=c["num_attention_heads"],
                                  num_key_value_heads=c["num_key_value_heads"], rope_theta=c["rope_theta"],
                                  max_position_embeddings=c["max_position_embeddings"], attention_bias=False)
        attn_config._attn_implementation = "sdpa"
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        dense = c.get("first_k_dense_replace", 0)
        self.model.layers = nn.ModuleList(_Layer(c, attn_config, i, moe=i >= dense)
                                          for i in range(c["num_hidden_layers"]))
        self.model.norm = LlamaRMSNorm(c["hidden_size"], eps=c["rms_norm_eps"])
        self.model.rotary_emb = LlamaRotaryEmbedding(attn_config)
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        if self.model.embed_tokens.weight.device.type != "meta":
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, 0.0, 0.02)
        self.to(dtype)

    @property
    def device(self):
        return self.lm_head.weight.device

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids, use_cache=False, **kwargs):
        h = self.model.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        pos = self.model.rotary_emb(h, positions)
        for layer in self.model.layers:
            h = layer(h, position_embeddings=pos)
        return CausalLMOutput(logits=self.lm_head(self.model.norm(h)))
