"""Tables from run records (`dynamo-tables`, or `python scripts/make_tables.py`): nothing is typed by hand.

records (which records feed a table) -> samples (their per-window files, checked against them) -> one
renderer per table (embedded, multiple_choice, overheads, paper) -> latex / pareto; cli.RENDERERS names them.
"""

from .cli import RENDERERS, main
from .records import load_records, pick
from .samples import StaleSamplesError

__all__ = ["RENDERERS", "StaleSamplesError", "load_records", "main", "pick"]
