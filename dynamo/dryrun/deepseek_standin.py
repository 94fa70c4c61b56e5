"""DeepSeek-MoE-16B at its real shapes, as the project's ModuleList stand-in.

The checkpoint's own modelling code ships in its hub repository (remote code), which a dry run
neither has nor should execute. This module reproduces the layout the `deepseek` adapter reads
(tests/adapters/tiny_families.py is the tiny version): `model.layers[i].mlp`, dense first
`first_k_dense_replace` layers, an `nn.ModuleList` of SwiGLU experts, `shared_experts` of width
n_shared_experts * moe_intermediate_size, a softmax top-k gate and the `moe_infer(x, idx, weight)`
dispatch. Attention is Llama's (DeepSeek-MoE's is the same multi-head attention with RoPE), so
parameter counts and compute match the real model.

It loads the way the real checkpoint does: as remote code. `save_remote_code(model, dir)` writes a
checkpoint whose config.json `auto_map` names this file, copied beside the weights, so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` (and `run.py model=local
model.path=dir model.trust_remote_code=true`) builds it, and refuses it without that flag. That is
why this file imports only torch and transformers: transformers imports it on its own, outside
this package.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import LlamaConfig, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutput
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding


class DeepseekStandInConfig(PretrainedConfig):
    """The published config.json's keys, kept as they are (assets/configs/deepseek-moe.json)."""

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
        self.weight = nn.Parameter(torch.empty(experts, hidden))
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob

    def forward(self, x):
        scores = (x.reshape(-1, x.shape[-1]).float() @ self.weight.float().T).softmax(-1)
        weight, idx = scores.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weight = weight / weight.sum(-1, keepdim=True)
        return idx, weight.to(x.dtype), None


class DeepseekMoE(nn.Module):
    def __init__(self, c: DeepseekStandInConfig):
        super().__init__()
        hidden, inter, act = c.hidden_size, c.moe_intermediate_size, getattr(c, "hidden_act", "silu")
        self.gate = _Gate(hidden, c.n_routed_experts, c.num_experts_per_tok, getattr(c, "norm_topk_prob", False))
        self.experts = nn.ModuleList(_MLP(hidden, inter, act) for _ in range(c.n_routed_experts))
        self.shared_experts = _MLP(hidden, c.n_shared_experts * inter, act)

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


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, c: DeepseekStandInConfig, attn_config: LlamaConfig, index: int, moe: bool):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.self_attn = LlamaAttention(attn_config, layer_idx=index)
        self.post_attention_layernorm = LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.mlp = DeepseekMoE(c) if moe else _MLP(c.hidden_size, c.intermediate_size, getattr(c, "hidden_act", "silu"))

    def forward(self, hidden_states, position_embeddings=None, **kwargs):
        # attention_mask=None: sdpa's causal mask (the pipeline feeds unpadded windows)
        attn, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings=position_embeddings,
                                 attention_mask=None)
        h = hidden_states + attn
        return h + self.mlp(self.post_attention_layernorm(h))


def _attention_config(c: DeepseekStandInConfig) -> LlamaConfig:
    attn = LlamaConfig(hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
                       num_key_value_heads=c.num_key_value_heads, rope_theta=c.rope_theta,
                       max_position_embeddings=c.max_position_embeddings, attention_bias=False)
    attn._attn_implementation = "sdpa"
    return attn


class DeepseekStandInForCausalLM(PreTrainedModel):
    config_class = DeepseekStandInConfig
    base_model_prefix = "model"
    # a device_map never cuts a decoder layer (its attention and its MoE block stay together)
    _no_split_modules: ClassVar[list[str]] = ["DeepseekDecoderLayer"]

    def __init__(self, config: DeepseekStandInConfig):
        super().__init__(config)
        attn_config = _attention_config(config)
        dense = getattr(config, "first_k_dense_replace", 0) or 0
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(DeepseekDecoderLayer(config, attn_config, i, moe=i >= dense)
                                          for i in range(config.num_hidden_layers))
        self.model.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.model.rotary_emb = LlamaRotaryEmbedding(attn_config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)  # Linear, Embedding: N(0, 0.02); norms: 1; rotary inv_freq
        if isinstance(module, _Gate):
            init.normal_(module.weight, mean=0.0, std=getattr(self.config, "initializer_range", 0.02))

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("the DeepSeek-MoE stand-in runs unpadded windows only (attention_mask has zeros)")
        h = self.model.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        pos = self.model.rotary_emb(h, positions)
        for layer in self.model.layers:
            h = layer(h, position_embeddings=pos)
        return CausalLMOutput(logits=self.lm_head(self.model.norm(h)))


def save_remote_code(model: DeepseekStandInForCausalLM, path) -> None:
    """save_pretrained as a hub remote-code checkpoint: this file beside the weights, `auto_map` in config.json."""
    model.config.register_for_auto_class()
    model.register_for_auto_class("AutoModelForCausalLM")
    model.save_pretrained(path)
