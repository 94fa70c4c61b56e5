"""The adaptive switch on the packed model: equal to the fake-quantized model, its forward cost, a switch by name.
(dynamo.bench.packed_slots; `dynamo-bench-packed-slots` runs the same.)

    OMP_NUM_THREADS=2 python scripts/bench_packed_slots.py [--model testbed-qwen-moe] [--repeats 5]
"""

from dynamo.bench.packed_slots import main

if __name__ == "__main__":
    main()
