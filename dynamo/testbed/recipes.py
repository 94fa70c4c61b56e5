"""How each embedded model is built and trained: its transformers config and its `Recipe`.

The tiny-* recipes are frozen so the shipped models regenerate; the testbed recipes follow
shared/spec/TESTBED.md. A new model is one entry of ARCHITECTURES.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import OlmoeConfig, Qwen2MoeConfig

from ..data import embedded_split

SEED = 0
VOCAB_SIZE = 8192
SEQLEN = 512
EOS = "<|endoftext|>"
PAD = "<|pad|>"
KNOWN = tuple(embedded_split().known)  # the models are trained on the known domains only


@dataclass(frozen=True)
class Recipe:
    """How one model is trained. The tiny-* recipes are frozen: they regenerate the shipped models."""

    # tokens each known domain contributes per epoch (None: its whole training split)
    mix_tokens: dict = field(default_factory=lambda: {d: None for d in KNOWN})
    min_total_tokens: int = 10_000_000
    epochs: int = 1
    batch_size: int = 8
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1   # on 2-D weights except embeddings; never on norm gains or biases
    grad_clip: float = 1.0
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    # every window starts with the BOS token (<|endoftext|>): a fixed first token becomes the
    # attention sink real LLMs have (Sun et al. 2024; Gu et al. 2024)
    bos_windows: bool = False
    eval_every: int = 200
    eval_windows: int = 32
    track_sensitivity: bool = False  # outlier statistics and RTN-3bit loss at every eval point


COMMON = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=SEQLEN, rms_norm_eps=1e-6,
              tie_word_embeddings=False, output_router_logits=True, router_aux_loss_coef=0.01,
              dtype="float16")
TINY = dict(COMMON, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
# The quantization-realistic testbed (shared/spec/TESTBED.md): many tokens per
# non-embedding parameter (several epochs over every known-domain token), Pre-Norm SwiGLU,
# BOS at every window start, AdamW at a high learning rate with eps 1e-8 and beta2 0.95, no
# weight decay on gains and embeddings. Sensitivity must come from training alone.
TESTBED = dict(COMMON, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
LEGACY_MIX = {"code": 5_200_000, "docs": None, "speeches": None, "literature": None}
TESTBED_RECIPE = Recipe(epochs=3, lr=5e-3, min_lr=5e-4, warmup_steps=500, bos_windows=True, eval_every=500,
                        track_sensitivity=True)
ARCHITECTURES = {
    # The paper's main family: many small routed experts, no shared expert.
    "tiny-olmoe": (lambda ids: OlmoeConfig(**TINY, **ids, intermediate_size=256, num_experts=16,
                                           num_experts_per_tok=4, norm_topk_prob=False),
                   Recipe(mix_tokens=LEGACY_MIX)),
    # Qwen1.5-MoE / DeepSeek-MoE shape: routed experts plus a sigmoid-gated shared expert.
    "tiny-qwen-moe": (lambda ids: Qwen2MoeConfig(**TINY, **ids, intermediate_size=512, moe_intermediate_size=256,
                                                 shared_expert_intermediate_size=512, num_experts=16,
                                                 num_experts_per_tok=2, norm_topk_prob=False, qkv_bias=True,
                                                 decoder_sparse_step=1, mlp_only_layers=[]),
                      Recipe(mix_tokens=LEGACY_MIX)),
    # Testbed, Qwen2-MoE family: no QK-norm (Qwen2-MoE has none), 8 experts top-2 (more tokens
    # per expert than top-4 of 16) and a shared expert; 3.8 M non-embedding parameters.
    "testbed-qwen-moe": (lambda ids: Qwen2MoeConfig(**TESTBED, **ids, intermediate_size=512,
                                                    moe_intermediate_size=256, shared_expert_intermediate_size=256,
                                                    num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                                                    qkv_bias=True, decoder_sparse_step=1, mlp_only_layers=[]),
                         TESTBED_RECIPE),
    # Testbed, OLMoE family (transformers' OLMoE always has QK-norm, as the real OLMoE does).
    "testbed-olmoe": (lambda ids: OlmoeConfig(**TESTBED, **ids, intermediate_size=256, num_experts=8,
                                              num_experts_per_tok=2, norm_topk_prob=False),
                      TESTBED_RECIPE),
}
