"""A quantized model's routed experts as packed low-bit codes: the glue between the harness and `dynamo_kernels`.

- `weight.py`: one `QuantizedWeight` (dynamo.quant) -> `dynamo_kernels.PackedWeight`
- `model.py`: pack a model's experts from `QuantReport.codes`, attach them (`attach_packed`) or run them
  temporarily (`packed_forward`)
- `switching.py`: DQS switching that rewrites a packed model's channel rows in place (`PackedChannelStore`)
- `attached.py`: packed layers as the model's own parameters, run through transformers' experts registry
- `format.py`: the checkpoint format: the "dynamo" transformers quantization config and quantizer, the guard on
  config.json, `load_packed` (`remote_loader.py` is copied into every checkpoint; `hf_quantizer.py` and
  `dynamo.export.guard` are the format's old import paths, kept for checkpoints that import them)

The kernels (`dynamo_kernels`) never import this package: the arrows run dynamo -> dynamo_kernels.
Format and kernels: dynamo_kernels/README.md.
"""
