"""Does the adaptive switch's memory grow with depth? Real-shape dry runs of one model at several MoE
depths (scripts/dryrun.py, real width, CPU), side by side.
(dynamo.dryrun.depth; `dynamo-dryrun-depth` runs the same.)

    OMP_NUM_THREADS=2 python scripts/dryrun_depth.py --model olmoe --depths 1 2 4
"""

from dynamo.dryrun.depth import main

if __name__ == "__main__":
    main()
