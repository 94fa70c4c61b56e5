"""Extension-point tables whose names config schemas need before anything heavy is imported.

A config enum must be built when dynamo.config is imported, which is before torch and before the
implementations exist (they import dynamo.config themselves, so importing them from there would
be circular). A table here maps each name to "module:attribute"; the implementation is imported
on first use. The enum in dynamo.config is derived from the table, so a new entry is one line.
"""

from __future__ import annotations

from importlib import import_module

from .errors import UserError


class Registry:
    def __init__(self, option: str, entries: dict[str, str]):
        self.option, self.entries = option, dict(entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def get(self, name):
        name = getattr(name, "value", name)  # an enum member of a structured config, or its string
        if name not in self.entries:
            raise UserError(f"unknown {self.option} '{name}'; choose one of {', '.join(self.entries)}")
        module, attribute = self.entries[name].split(":")
        return getattr(import_module(module), attribute)


# DQS policies (dynamo/switching/policies.py): what a switch restores, and from what.
SWITCH_POLICIES = Registry("quant.switching.policy", {
    "adaptive": "dynamo.switching.policies:AdaptivePolicy",   # ours: chosen per dataset from its calib split
    "paper": "dynamo.switching.policies:PaperPolicy",         # the paper's: channels fixed offline, re-allocated
})
