"""DynaMo: runtime-switchable quantization for Mixture-of-Experts language models.

The reference implementation of arXiv 2503.21135 as an experiment harness. The data flow
(config -> model -> calibration -> significance -> plan -> quantized model -> evaluation ->
record) is wired in `dynamo.pipeline`; `run.py` is the Hydra entry point.
"""

__version__ = "0.1.0"


def _unpack_embedded_assets() -> None:
    """The embedded models' weights are committed xz-compressed (dynamo/assets.py): unpacked once, here."""
    from .assets import ensure_unpacked

    ensure_unpacked()


_unpack_embedded_assets()
