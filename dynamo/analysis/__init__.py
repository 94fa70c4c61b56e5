"""DynaMo's multi-level analysis (spec Step 1): channel and expert significance per dataset."""

from .significance import UNITS, Significance, channel_significance, expert_shares
from .stage import analysis_datasets, analyze

__all__ = ["UNITS", "Significance", "analysis_datasets", "analyze", "channel_significance",
           "expert_shares"]
