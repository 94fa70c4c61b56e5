"""Fused dequantize + matmul kernel speed against the FP16 torch matmul, on MoE expert projections
(dynamo.bench.kernels; `dynamo-bench-kernels` runs the same).

    python scripts/bench_kernels.py [--bits 2 3 4 6 8] [--batches 1 4 16 64] [--rep-ms 100]
    python scripts/bench_kernels.py --check     # a tiny correctness pass; runs on CPU too
"""

from dynamo.bench.kernels import main

if __name__ == "__main__":
    main()
