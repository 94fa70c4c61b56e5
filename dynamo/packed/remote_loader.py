"""Shipped inside every packed DynaMo checkpoint as dynamo_packed.py (config.json's auto_map points here).

transformers runs this file only with trust_remote_code=True. It loads nothing by itself: it imports
the DynaMo harness, which knows the packed format, and hands transformers the checkpoint's real
config; without the harness it raises an ImportError that says how to load the checkpoint. Without
trust_remote_code, transformers refuses the checkpoint before reaching this file.
"""

from transformers import PretrainedConfig

HOW = ("This is a packed DynaMo checkpoint: its routed experts are packed low-bit codes that only the DynaMo "
       "harness reads. Put the harness on the Python path (PYTHONPATH=<harness checkout>) and load it with "
       "dynamo.packed.format.load_packed(path), or python run.py model=local model.path=<checkpoint> quant=fp16. "
       "For a checkpoint any tool loads, export the run with quant.export=dequantized.")


def _harness():
    # every harness import sits inside this try: transformers' import check skips try blocks, so a
    # missing harness gets this message instead of transformers' "pip install <module>" advice (the
    # harness is no PyPI package)
    try:
        from dynamo.packed import format as packed_format
    except ImportError as err:
        raise ImportError(f"{HOW} (import failed: {err})") from None
    return packed_format


class DynamoPackedConfig(PretrainedConfig):
    """Never instantiated: reading it gives the checkpoint's real config (e.g. OlmoeConfig) instead."""

    model_type = "dynamo_packed"

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        return _harness().base_config(config_dict, **kwargs)


class DynamoPackedForCausalLM:
    """Named by auto_map for tools that look for it; loading goes through the real architecture."""

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        return _harness().load_packed(path, *args, **kwargs)
