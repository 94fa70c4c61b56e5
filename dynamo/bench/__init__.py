"""Benchmarks and predictions behind the README's speed and memory numbers (scripts/bench_*.py,
decode_roofline.py and kernels_compiled.py are their command lines). Nothing in a run imports this package."""
