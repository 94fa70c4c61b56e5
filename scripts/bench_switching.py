"""DynaMo's online switch (DQS) on the embedded model: latency, bytes moved, cache size.
(dynamo.bench.switching_run; `dynamo-bench-switching` runs the same.)

    OMP_NUM_THREADS=1 python scripts/bench_switching.py [--model testbed-qwen-moe] [--repeats 3] [--modes requant fp16]
"""

from dynamo.bench.switching_run import main

if __name__ == "__main__":
    main()
