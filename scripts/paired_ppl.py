"""Is run B's perplexity really different from run A's? A paired bootstrap over eval windows
(dynamo.tables.paired; `dynamo-paired-ppl` runs the same).

    python scripts/paired_ppl.py results/runs/<run A> results/runs/<run B> [--resamples 2000]
"""

import sys

from dynamo.tables.paired import main

if __name__ == "__main__":
    sys.exit(main())
