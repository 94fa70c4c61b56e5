"""The embedded testbed: the small MoE models the harness is checked on, and how they are made and judged.

corpora (the text domains, rebuilt from package registries) -> recipes + training_data -> training
(+ checkpoints) -> probes (outlier statistics, undoable fake quantization, routing frequencies) ->
sensitivity (is the model quantization-sensitive like a real LLM?) -> model_card. Nothing in `dynamo`'s
pipeline imports this package: it makes and probes the models a run loads from assets/models/.
"""
