"""How a table cell is written: numbers, significance marks and intervals."""

from __future__ import annotations

import math

from .. import stats

SIGNIFICANT, NOT_SIGNIFICANT, NO_CI = "†", "n.s.", "(no CI)"


def bos_note(protocol: dict) -> str:
    """Windows of a model trained with BOS-led windows (model.bos_windows) hold one token fewer of text."""
    if protocol.get("bos_id") is None:
        return ""
    return f" (a BOS token and {protocol['seqlen'] - 1} text tokens, as the model was trained)"


def fmt(x: float | None, digits: int = 2) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def significance_mark(interval: stats.Interval | None, null: float) -> str:
    if interval is None:
        return NO_CI
    return SIGNIFICANT if interval.excludes(null) else NOT_SIGNIFICANT


def ci_text(interval: stats.Interval | None, digits: int = 4, scale: float = 1.0, unit: str = "") -> str:
    if interval is None:
        return "n/a"
    f = lambda x: f"{scale * x:.{digits}f}{unit}"  # noqa: E731
    return f"{f(interval.estimate)} [{f(interval.low)}, {f(interval.high)}]"


def pct_change(interval: stats.Interval | None) -> str:
    """A PPL ratio as a signed % change: DQS effects of 0.01% need the digits a ratio would hide."""
    if interval is None:
        return "n/a"
    return (f"{100 * (interval.estimate - 1):+.3f} [{100 * (interval.low - 1):+.3f}, "
            f"{100 * (interval.high - 1):+.3f}]")
