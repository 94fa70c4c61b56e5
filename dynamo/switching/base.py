"""What every DQS switcher shares: the switched state as a context, and one summary type.

    with switcher.switched(windows) as report:        # or switched("code", windows): a dataset by name
        evaluate(model)                               # the model as switched
    # BQ again here, bit for bit, also when the block raised

    with switcher.restored():                         # several switches (a stream, one per dataset)
        ...

A switcher (dynamo.switching.switch.DynamicSwitcher, the paper's; .adaptive.AdaptiveSwitcher, ours)
implements `switch_to(windows)`, `switch_for(name, windows)`, `restore_bq()` and `summary()`; this
class turns the unwritten protocol "switch, evaluate, restore_bq() before anything else reads the
model" into a block that cannot forget the restore.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


COMMON = ("policy", "variant", "resident_nbytes", "resident_as")  # SwitchSummary's own fields, in record order


@dataclass(frozen=True)
class SwitchSummary(Mapping):
    """A switcher's summary, the same fields for every policy, so that a report or a table reads it without
    asking which policy wrote it. It reads as the record's `switching` block (a Mapping over `to_dict()`),
    whose keys predate this type: the policy's own fields (`extra`) stay at the top level."""

    policy: str          # its name in dynamo.registry.SWITCH_POLICIES
    variant: str         # the setting that tells two runs of the policy apart in a table
    # bytes the policy keeps on the model's device to switch, beyond BQ (what a GPU is sized by), and what they
    # are, in words, for reports. Not "nbytes": the summary is spread into other records (a slot set's index
    # entry) whose own "nbytes" it must not overwrite
    resident_nbytes: int
    resident_as: str     # "slot budget", "channel cache + BQ copy"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_record(cls, block: Mapping) -> SwitchSummary:
        """A run record's `switching` block (its `switches` aside) as the summary that wrote it. A block from
        before this type existed lacks the common fields: they are read from what its two policies wrote
        then (paper: channel_mode, its cache and BQ copy; adaptive: candidates, its slot budget)."""
        extra = {k: v for k, v in block.items() if k not in COMMON and k != "switches"}
        if "resident_nbytes" in block:
            return cls(*(block[k] for k in COMMON), extra=extra)
        if "cache" in block:
            return cls(block["policy"], block["channel_mode"], block["cache"]["nbytes"] + block["bq_copy_nbytes"],
                       "channel cache + BQ copy", extra)
        return cls(block["policy"], block["candidates"], block["budget_nbytes"], "slot budget", extra)

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "variant": self.variant, "resident_nbytes": self.resident_nbytes,
                "resident_as": self.resident_as, **self.extra}

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


class Switcher:
    """Base of the DQS switchers: the context managers, written once for both."""

    def switch_to(self, windows):
        raise NotImplementedError

    def switch_for(self, name: str, windows):
        raise NotImplementedError

    def restore_bq(self):
        raise NotImplementedError

    def summary(self) -> SwitchSummary:
        raise NotImplementedError

    @contextmanager
    def restored(self) -> Iterator[None]:
        """Whatever the block switches to, the model holds BQ again when it leaves, by return or by error."""
        try:
            yield
        finally:
            self.restore_bq()

    @contextmanager
    def switched(self, target, windows=None):
        """Switch to `target` for the block and yield the switch's report; BQ again on exit and on error.

        `target`: token windows [n, seqlen] (switch_to), or a dataset name (switch_for: its saved slot set
        where the switcher has one, else a switch to `windows`). A switch that fails leaves BQ too."""
        with self.restored():
            yield self.switch_for(target, windows) if isinstance(target, str) else self.switch_to(target)
