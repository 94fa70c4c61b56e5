"""Families recognised but not supported yet: their expert tensors are stored transposed."""

from .base import MoEAdapter, register_adapter

_TRANSPOSED = ("stores experts transposed ([E, H, 2I], {detail}); DynaMo's per-expert views assume "
               "[E, 2I, H]. Open an issue if you need it")

register_adapter(MoEAdapter(model_type="gpt_oss", storage="fused_3d", n_experts="num_local_experts",
                            refuse=_TRANSPOSED.format(detail="gate/up interleaved, with biases")))
for model_type in ("llama4", "llama4_text"):
    register_adapter(MoEAdapter(model_type=model_type, storage="fused_3d", n_experts="num_local_experts",
                                refuse=_TRANSPOSED.format(detail="router named `router`")))
