"""A dataset's slot set: what the adaptive switch chose and computed for it, as one typed artifact.

`SlotSet` holds, per MoE layer, a `dynamo_kernels.slots.SlotTable` (row, column and low-rank
corrections of the BQ weights, 8-bit codes or fp16) and, for `candidates=experts8|all`, whole matrices at 8 bits
(fake-quantized models only). It is all a switch needs: a switch computes one from new windows and
the master copy; a switch "by name" copies a saved one into the model, no master needed.

Saved sets live in a `slot_sets/` folder beside a packed export: `<name>.safetensors` (tensors
only, never a pickle) and `index.json` (per set: file, size, digest (size + sha256), counts, and the
fingerprint of the model and plan it was made for). Loading refuses an unknown name, another model's set and a
truncated or altered file with one `error:` line, before anything touches the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dynamo_kernels.slots import KINDS, LowRankGroup, SlotGroup, SlotTable

from ..errors import UserError
from ..quant.rtn import QuantizedWeight
from ..quant.spec import QSpec
from ..records import save_tensors_atomic, write_json_atomic
from .store import Key

SLOT_SETS_DIR = "slot_sets"
INDEX = "index.json"
FORMAT = 1


@dataclass
class SlotSet:
    tables: dict[int, SlotTable] = field(default_factory=dict)   # MoE layer -> its row/column slots
    experts8: dict[Key, QuantizedWeight] = field(default_factory=dict)  # whole matrices at 8 bits
    group_size: int = 128
    slot_bits: int = 8

    @property
    def nbytes(self) -> int:
        """Device bytes of the slots (for experts8: the 8-bit codes with their scales and zeros)."""
        eight = sum(q.codes.numel() + 2 * 2 * q.scales.numel() for q in self.experts8.values())
        return sum(t.nbytes for t in self.tables.values()) + eight

    def counts(self) -> dict[str, int]:
        n = {kind: sum(int(g.index.numel()) for t in self.tables.values() for (_, k), g in t.groups.items()
                       if k == kind) for kind in KINDS}
        return {"rows": n["rows"], "columns": n["cols"], "lowrank": n["lowrank"],
                "experts8": len({k[:2] for k in self.experts8})}

    def experts_changed(self) -> int:
        touched = {(i, int(e)) for i, t in self.tables.items() for g in t.groups.values()
                   for e in torch.unique(g.expert).tolist()}
        return len(touched | {k[:2] for k in self.experts8})

    def slot_values(self) -> int:
        """Values the slots hold (row and column values, low-rank factors): for exact_bits."""
        return sum(g.values for t in self.tables.values() for g in t.groups.values())

    def to(self, device) -> SlotSet:
        return SlotSet({i: t.to(device) for i, t in self.tables.items()},
                       {k: q.to(device) for k, q in self.experts8.items()}, self.group_size, self.slot_bits)

    # --- files ---------------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, table in self.tables.items():
            for (p, kind), group in table.groups.items():
                out |= {f"L{i}.{p}.{kind}.{name}": t.contiguous().cpu() for name, t in group.tensors().items()}
        for (i, e, p), q in self.experts8.items():
            out |= {f"E{i}.{e}.{p}.{name}": t.contiguous().cpu() for name, t in
                    (("codes", q.codes), ("scales", q.scales), ("zeros", q.zeros))}
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], n_experts: dict[int, int], group_size: int,
                     slot_bits: int) -> SlotSet:
        groups: dict[int, dict[tuple[str, str], dict[str, torch.Tensor]]] = {}
        eight: dict[Key, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            head, *rest = name.split(".")
            if head.startswith("L") and len(rest) == 3:
                groups.setdefault(int(head[1:]), {}).setdefault((rest[0], rest[1]), {})[rest[2]] = t
            elif head.startswith("E") and len(rest) == 3:
                eight.setdefault((int(head[1:]), int(rest[0]), rest[1]), {})[rest[2]] = t
            else:
                raise ValueError(f"unexpected tensor '{name}'")
        tables = {}
        for i, by_group in groups.items():
            if i not in n_experts:
                raise ValueError(f"layer {i} is not an MoE layer of this model")
            tables[i] = SlotTable(n_experts[i], {
                key: (LowRankGroup if key[1] == "lowrank" else SlotGroup).from_tensors(n_experts[i], t, group_size)
                for key, t in by_group.items()})
        spec = QSpec(8, group_size)
        experts8 = {k: QuantizedWeight(t["codes"], t["scales"], t["zeros"], spec) for k, t in eight.items()}
        return cls(tables, experts8, group_size, slot_bits)


def fingerprint(description: dict) -> str:
    """sha256 of a JSON description of the model and plan a slot set is made for."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def packed_fingerprint(model) -> str:
    """What a slot set depends on in a packed model: its type and sizes, every layer's packed layout (the
    plan's widths and groups) and a digest of each layer's first packed scales (the BQ values themselves:
    the same plan on another checkpoint gets another fingerprint). Cheap: no codes are read."""
    from ..packed.model import packed_modules

    config = getattr(model.config, "text_config", None) or model.config
    layers = {}
    for i, module in packed_modules(model).items():
        stacks = [s for s in module.experts().stages["gate_up"] if not s.is_dense]
        digest = (hashlib.sha256(stacks[0].scales[0].detach().cpu().numpy().tobytes()).hexdigest()
                  if stacks else None)
        layers[str(i)] = {"layout": module.layout, "scales_sha256": digest}
    return fingerprint({"model_type": config.model_type, "hidden_size": config.hidden_size,
                        "vocab_size": config.vocab_size, "layers": layers})


def _digest(path: Path) -> str:
    """'<size>:<sha256 prefix>', through dynamo.fingerprint's per-process cache keyed by (path, size, mtime):
    a set is hashed once per process, not on every switch to it (about a GB per set at Mixtral's size)."""
    from ..fingerprint import file_digest

    return file_digest(path)


def save_slot_set(folder: Path, name: str, slots: SlotSet, model_fingerprint: str, meta: dict | None = None) -> dict:
    """Write `slots` as `folder/<name>.safetensors` and add it to `folder/index.json` (each atomically)."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise UserError(f"a slot set's name must be a plain file name, got '{name}'")
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{name}.safetensors"
    save_tensors_atomic(file, slots.tensors())
    index = _read_index(folder) if (folder / INDEX).is_file() else {"format": FORMAT, "sets": {}}
    entry = {"file": file.name, "nbytes": file.stat().st_size, "digest": _digest(file),
             "fingerprint": model_fingerprint, "group_size": slots.group_size, "slot_bits": slots.slot_bits,
             "device_nbytes": slots.nbytes, "counts": slots.counts(), **(meta or {})}
    index["sets"][name] = entry
    write_json_atomic(folder / INDEX, index)
    return entry


def _read_index(folder: Path) -> dict:
    try:
        index = json.loads((folder / INDEX).read_text())
        if index.get("format") != FORMAT or not isinstance(index.get("sets"), dict):
            raise ValueError("unknown format")
        return index
    except (OSError, ValueError) as err:
        raise UserError(f"{folder / INDEX} is not a slot-set index written by this harness ({err})") from None


def saved_names(folder: Path) -> list[str]:
    return sorted(_read_index(folder)["sets"]) if (folder / INDEX).is_file() else []


def saved_entry(folder: Path, name: str | None = None) -> dict:
    """The index entry of `name` (default: any one; they share the switch's settings)."""
    if not (folder / INDEX).is_file():
        raise UserError(f"no saved slot sets in {folder} (no {INDEX}); a run with quant.export=packed writes them")
    sets = _read_index(folder)["sets"]
    if not sets:
        raise UserError(f"{folder / INDEX} lists no slot sets")
    return sets[name] if name in sets else next(iter(sets.values()))


def load_slot_set(folder: Path, name: str, model_fingerprint: str, n_experts: dict[int, int]) -> SlotSet:
    """The saved set `name`, checked against the index (size, sha256) and the model's fingerprint."""
    from safetensors.torch import load_file

    if not (folder / INDEX).is_file():
        raise UserError(f"no saved slot sets in {folder} (no {INDEX}); a run with quant.export=packed writes them")
    entry = _read_index(folder)["sets"].get(name)
    if entry is None:
        raise UserError(f"no saved slot set '{name}' in {folder}; saved: {', '.join(saved_names(folder)) or 'none'}")
    if entry["fingerprint"] != model_fingerprint:
        raise UserError(f"slot set '{name}' in {folder} was made for another model or plan (fingerprint "
                        f"{entry['fingerprint'][:12]}, this model {model_fingerprint[:12]})")
    file = folder / entry["file"]
    if not file.is_file() or file.stat().st_size != entry["nbytes"] or _digest(file) != entry["digest"]:
        raise UserError(f"slot set file {file} is missing, truncated or altered (its size or sha256 differs from "
                        f"{INDEX}); re-run the export that wrote it")
    try:
        return SlotSet.from_tensors(load_file(str(file)), n_experts, int(entry["group_size"]),
                                    int(entry["slot_bits"]))
    except (ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"slot set file {file} does not hold a slot set for this model ({err})") from None
