"""Tables from run records: nothing in a table is typed by hand.

    python scripts/make_tables.py                 # every table below, into results/tables/
    python scripts/make_tables.py baselines       # one of them
    python scripts/make_tables.py --check         # rebuild in memory, fail if a committed table differs
    python scripts/make_tables.py --figures       # also the PPL-vs-bits (Pareto) figure of every method
    python scripts/make_tables.py --wandb         # also log the tables to W&B (offline; `wandb sync` later)

Each table reads the `result.json` records under results/runs/ (recursively), picks for every
(model, quant preset) the newest record made by the table's experiment presets, and writes Markdown with the
command that regenerates the runs, the PPL protocol, and the run ids it used.

Comparative tables mark every cell compared with a reference row (FP16, GPTQ-3bit, or BQ for a
DQS row: the `vs` column) by whether its 95% paired-bootstrap interval (dynamo.stats, over the
per-window losses beside each record) excludes no change, and list the intervals below.
`--wandb` also logs the written tables to W&B (dynamo.loggers.publish_tables).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import REPO_ROOT
from ..records import atomic_path
from .embedded import TABLES, render
from .latex import to_latex
from .multiple_choice import render_table2_embedded
from .overheads import render_overheads
from .pareto import write_pareto
from .paper import render_table1, render_table2, render_table3
from .records import load_records
from .samples import StaleSamplesError, clear_caches

RUNS = REPO_ROOT / "results" / "runs"
OUT = REPO_ROOT / "results" / "tables"
# one registry of tables: a new table is one renderer (records -> Markdown) added here
RENDERERS = {**{name: (lambda records, spec=spec: render(spec, records)) for name, spec in TABLES.items()},
             "table1": render_table1, "table2": render_table2, "table2_embedded": render_table2_embedded, "table3": render_table3,
             "overheads": render_overheads}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="*", help=f"default: all of {', '.join(RENDERERS)}")
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="compare with the committed tables, write nothing")
    parser.add_argument("--figures", action="store_true", help="also write pareto_<model>.png (not --check'ed)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the written tables to W&B as an artifact and wandb.Tables "
                             "(the run lands under <out>/wandb/; offline: `wandb sync` uploads it later)")
    parser.add_argument("--wandb-mode", choices=("offline", "online"), default="offline")
    args = parser.parse_args(argv)
    unknown = [t for t in args.tables if t not in RENDERERS]
    if unknown:
        parser.error(f"unknown table(s) {unknown}; choose from {', '.join(RENDERERS)}")
    clear_caches()  # files may have changed since an earlier call
    records = load_records(args.runs)
    stale, written = [], []
    try:  # every table rendered before any is written: an error leaves the committed set as it was
        pages = {name: RENDERERS[name](records) for name in args.tables or list(RENDERERS)}
    except StaleSamplesError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, markdown in pages.items():
        for path, text in ((args.out / f"{name}.md", markdown), (args.out / f"{name}.tex", to_latex(markdown))):
            if args.check:
                if not path.is_file() or path.read_text() != text:
                    stale.append(str(path))
                continue
            with atomic_path(path) as tmp:
                tmp.write_text(text)
            written.append(path)
            print(f"wrote {path}")
    if args.figures and not args.check:
        for path in write_pareto(records, args.out):
            print(f"wrote {path}")
    if args.wandb and written:
        from ..config import LoggerBackend, LoggerConfig, WandbMode
        from ..loggers import publish_tables

        cfg = LoggerConfig(name="wandb", backend=LoggerBackend.wandb, mode=WandbMode(args.wandb_mode))
        print(f"W&B ({args.wandb_mode}): {publish_tables(written, cfg, args.out)}")
    if stale:
        print("error: these tables differ from what the records give; run python scripts/make_tables.py: "
              + ", ".join(stale), file=sys.stderr)
        return 1
    return 0
