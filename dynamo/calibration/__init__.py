"""Routed calibration: per-(layer, expert) statistics from the tokens each expert is sent."""

from .capture import POLICIES, capture, capture_sequential
from .coverage import coverage_summary, coverage_table
from .stats import CHANNEL_STATS, CHANNEL_UNITS, CalibrationStats, ExpertGroupStats, LayerStats

__all__ = ["POLICIES", "capture", "capture_sequential", "coverage_summary", "coverage_table", "CHANNEL_STATS",
           "CHANNEL_UNITS", "CalibrationStats", "ExpertGroupStats", "LayerStats"]
