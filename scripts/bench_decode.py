"""End-to-end decode speed: FP16 against the packed BQ model and packed BQ + full slot tables.
(dynamo.bench.decode; `dynamo-bench-decode` runs the same.)

    python scripts/bench_decode.py                          # GPU: OLMoE's shapes, full depth, random weights
    python scripts/bench_decode.py --model mixtral --layers 8
    python scripts/bench_decode.py --toy --new-tokens 4 --prompt 8 --out /tmp/d.json    # CPU, toy shapes (tests)
"""

import sys

from dynamo.bench.decode import main

if __name__ == "__main__":
    sys.exit(main())
