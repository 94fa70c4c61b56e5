"""Evaluation: token perplexity (the quantization papers' protocol) and lm-eval tasks."""
