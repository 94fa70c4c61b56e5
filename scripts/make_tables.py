"""Tables from run records: nothing in a table is typed by hand (dynamo.tables; `dynamo-tables` runs the same).

    python scripts/make_tables.py                 # every table, into results/tables/
    python scripts/make_tables.py baselines       # one of them
    python scripts/make_tables.py --check         # rebuild in memory, fail if a committed table differs
    python scripts/make_tables.py --figures       # also the PPL-vs-bits (Pareto) figure of every method
    python scripts/make_tables.py --wandb         # also log the tables to W&B (offline; `wandb sync` later)
"""

import sys

from dynamo.tables.cli import main

if __name__ == "__main__":
    sys.exit(main())
