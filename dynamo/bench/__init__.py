"""Benchmarks and predictions behind the speed and memory numbers of README.md and docs/ (scripts/bench_*.py,
decode_roofline.py and kernels_compiled.py are their command lines). Nothing in a run imports this package."""
