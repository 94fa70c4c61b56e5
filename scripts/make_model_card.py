"""Evaluate the embedded models and write their model cards (dynamo.testbed.model_card; `dynamo-model-card`
runs the same).

    python scripts/make_model_card.py [tiny-olmoe tiny-qwen-moe]
    python scripts/make_model_card.py --card-only   # after scripts/probe_sensitivity.py: cards only
"""

from dynamo.testbed.model_card import main

if __name__ == "__main__":
    main()
