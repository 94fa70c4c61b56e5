"""Real-shape dry run on CPU: a paper model's published config, random weights, its first layers,
through the whole pipeline; measurements and an extrapolation to the full model.
(dynamo.dryrun.cli; `dynamo-dryrun` runs the same.)

    OMP_NUM_THREADS=2 python scripts/dryrun.py --model qwen-moe [--moe-layers 2]
    python scripts/dryrun.py --model deepseek-moe --shrink    # seconds: the same path at toy widths
"""

from dynamo.dryrun.cli import main

if __name__ == "__main__":
    main()
