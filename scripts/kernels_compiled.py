"""Compile every kernel specialization for sm_80 (A100) and sm_90 (H100) on this CPU and report its resources.
(dynamo.bench.compiled; `dynamo-kernels-compiled` runs the same.)

    python scripts/kernels_compiled.py                    # all -> results/benchmarks/kernels_compiled.json
    python scripts/kernels_compiled.py --quick --out X    # a few specializations (the tests)
"""

import sys

from dynamo.bench.compiled import main

if __name__ == "__main__":
    sys.exit(main())
