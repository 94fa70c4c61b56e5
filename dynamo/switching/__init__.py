"""DynaMo's online stage (spec Step 3, DQS): the FP16 channel cache, the channel-level switch,
the routing-shift detector that decides when to switch, and a stream runner that uses both.
What every switcher shares (the switched state as a context, SwitchSummary): base.py."""

from .base import Switcher, SwitchSummary
from .cache import ChannelCache
from .detector import DetectorStep, RoutingShiftDetector, js_divergence, known_reference, mean_jsd
from .stream import SegmentResult, StreamReport, SwitchEvent, forward_with_routing, run_stream
from .switch import CHANNEL_MODES, DynamicSwitcher, SwitchReport

__all__ = ["ChannelCache", "DetectorStep", "RoutingShiftDetector", "js_divergence", "known_reference", "mean_jsd",
           "SegmentResult", "StreamReport", "SwitchEvent", "forward_with_routing", "run_stream", "CHANNEL_MODES",
           "DynamicSwitcher", "SwitchReport", "Switcher", "SwitchSummary"]
