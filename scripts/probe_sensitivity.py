"""How sensitive is a MoE model to weight quantization of its experts? Like a real LLM, or not?
(dynamo.testbed.sensitivity; `dynamo-probe-sensitivity` runs the same.)

    python scripts/probe_sensitivity.py assets/models/tiny-olmoe
    python scripts/probe_sensitivity.py assets/models/testbed-qwen-moe --max-windows 40
"""

import sys

from dynamo.testbed.sensitivity import main

if __name__ == "__main__":
    sys.exit(main())
