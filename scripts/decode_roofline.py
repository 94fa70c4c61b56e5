"""Predicted decode speed of the packed (BQ) paper models against FP16: a memory-bandwidth roofline.
(dynamo.bench.roofline; `dynamo-decode-roofline` runs the same.)

    python scripts/decode_roofline.py            # -> results/benchmarks/decode_roofline.json
"""

import sys

from dynamo.bench.roofline import main

if __name__ == "__main__":
    sys.exit(main())
