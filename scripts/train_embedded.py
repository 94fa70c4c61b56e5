"""Train the embedded tokenizer and tiny MoE models from scratch on the known domains
(dynamo.testbed: recipes, training_data, training, checkpoints; `dynamo-train-testbed` runs the same).

    python scripts/train_embedded.py tokenizer          # byte-level BPE -> assets/tokenizer
    python scripts/train_embedded.py model tiny-olmoe   # -> assets/models/tiny-olmoe
    python scripts/train_embedded.py model testbed-qwen-moe --resume --stop-after-minutes 120
"""

from dynamo.testbed.train_cli import main

if __name__ == "__main__":
    main()
