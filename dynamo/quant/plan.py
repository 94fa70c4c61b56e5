"""QuantPlan: which QSpec each (layer, expert, projection) gets. Data, not code.

The JSON reads as a document and is meant to be edited by hand:

    {"schema_version": 1,
     "model": {"name": "tiny-olmoe", "model_type": "olmoe"},
     "created_by": {"method": "gptq", "allocation": "uniform", "git": "..."},
     "defaults": {"method": "gptq", "bits": 3, "group_size": 128, "sym": false},
     "layers": {"0": {"experts": {"0": 4, "1": {"down": 8}}, "shared": 8}},
     "fp16_modules": ["attention", "router", "embeddings", "lm_head"]}

An expert entry is a bit-width for all three projections or a {projection: bits} map;
anything not listed uses the defaults. `avg_bits` is never stored: it is recomputed from the
plan and the model (bits.py). Unknown keys, layers or experts are errors at load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters.base import PROJECTIONS, SHARED
from ..errors import UserError
from ..records import write_json_atomic
from ..registry import QUANTIZERS
from .spec import QSpec

SCHEMA_VERSION = 1
TOP_KEYS = {"schema_version", "model", "created_by", "defaults", "layers", "fp16_modules"}


@dataclass
class QuantPlan:
    method: str
    default: QSpec
    # (layer, expert index or "shared", projection) -> bits, only where it differs from the default
    bits: dict[tuple[int, int | str, str], int] = field(default_factory=dict)
    shared_default: int | None = None       # bits of every shared expert not listed; None = default bits
    model: dict = field(default_factory=dict)
    created_by: dict = field(default_factory=dict)
    fp16_modules: tuple[str, ...] = ("attention", "router", "embeddings", "lm_head")

    def __post_init__(self):
        # the plan quantizers of dynamo.registry.QUANTIZERS (rtn, gptq and any plugin's), not a list kept here
        methods = [name for name in QUANTIZERS.names if QUANTIZERS.get(name).plan]
        if self.method not in methods:
            raise UserError(f"unknown quantization method '{self.method}'; choose one of {', '.join(methods)}")

    def spec_for(self, layer: int, expert: int | str, projection: str) -> QSpec:
        bits = self.bits.get((layer, expert, projection))
        if bits is None:
            bits = self.shared_default if expert == SHARED and self.shared_default is not None else self.default.bits
        return QSpec(bits=bits, group_size=self.default.group_size, sym=self.default.sym)

    def set_expert_bits(self, layer: int, expert: int | str, bits: int) -> None:
        QSpec(bits)  # validates the width
        for projection in PROJECTIONS:
            self.bits[(layer, expert, projection)] = bits

    # --- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        layers: dict[str, dict] = {}
        grouped: dict[tuple[int, int | str], dict[str, int]] = {}
        for (layer, expert, projection), bits in sorted(self.bits.items(), key=lambda kv: (kv[0][0], str(kv[0][1]),
                                                                                             kv[0][2])):
            grouped.setdefault((layer, expert), {})[projection] = bits
        for (layer, expert), per_proj in grouped.items():
            value = next(iter(per_proj.values())) if len(set(per_proj.values())) == 1 and len(per_proj) == 3 \
                else per_proj
            entry = layers.setdefault(str(layer), {})
            if expert == SHARED:
                entry[SHARED] = value
            else:
                entry.setdefault("experts", {})[str(expert)] = value
        defaults = {"method": self.method, "bits": self.default.bits, "group_size": self.default.group_size,
                    "sym": self.default.sym}
        if self.shared_default is not None:
            defaults["shared_bits"] = self.shared_default
        return {"schema_version": SCHEMA_VERSION, "model": self.model, "created_by": self.created_by,
                "defaults": defaults, "layers": layers, "fp16_modules": list(self.fp16_modules)}

    @classmethod
    def from_dict(cls, data: dict, where: str = "plan") -> "QuantPlan":
        unknown = set(data) - TOP_KEYS
        if unknown:
            raise UserError(f"{where}: unknown key(s) {sorted(unknown)}; a plan has {sorted(TOP_KEYS)}")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"{where}: schema_version {data.get('schema_version')} is not {SCHEMA_VERSION}")
        if not isinstance(data.get("defaults"), dict) or "bits" not in data["defaults"]:
            raise UserError(f"{where}: 'defaults' must hold at least 'bits' (e.g. \"defaults\": {{\"method\": \"gptq\", "
                            "\"bits\": 4}})")
        d = dict(data["defaults"])
        extra = set(d) - {"method", "bits", "group_size", "sym", "shared_bits"}
        if extra:
            raise UserError(f"{where}: unknown defaults key(s) {sorted(extra)}")
        try:
            default = QSpec(bits=int(d["bits"]), group_size=int(d.get("group_size", 128)), sym=bool(d.get("sym", False)))
            plan = cls(method=d.get("method", "gptq"), default=default, shared_default=d.get("shared_bits"),
                       model=data.get("model", {}), created_by=data.get("created_by", {}),
                       fp16_modules=tuple(data.get("fp16_modules", ())))
            for layer, entry in data.get("layers", {}).items():
                bad = set(entry) - {"experts", SHARED}
                if bad:
                    raise UserError(f"{where}: layer {layer}: unknown key(s) {sorted(bad)}")
                items = [(int(e), v) for e, v in entry.get("experts", {}).items()]
                if SHARED in entry:
                    items.append((SHARED, entry[SHARED]))
                for expert, value in items:
                    per_proj = value if isinstance(value, dict) else {p: value for p in PROJECTIONS}
                    for projection, bits in per_proj.items():
                        if projection not in PROJECTIONS:
                            raise UserError(f"{where}: layer {layer} expert {expert}: unknown projection "
                                            f"'{projection}' (use {', '.join(PROJECTIONS)})")
                        QSpec(int(bits))
                        plan.bits[(int(layer), expert, projection)] = int(bits)
            if plan.shared_default is not None:
                QSpec(int(plan.shared_default))
        except (ValueError, TypeError, AttributeError) as err:  # a width or key of the wrong JSON type
            raise UserError(f"{where}: {err}") from None
        return plan

    def save(self, path: Path) -> None:
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "QuantPlan":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"cannot read plan {path}: {err}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: a plan is a JSON object (see docs/extending.md, 'Write your own ablation')")
        return cls.from_dict(data, where=str(path))

    def validate_against(self, layers: dict[int, int], shared_layers: set[int]) -> None:
        """layers: MoE layer index -> expert count. Entries must name existing experts."""
        for layer, expert, _ in self.bits:
            if layer not in layers:
                raise UserError(f"plan names layer {layer}, but the model's MoE layers are {sorted(layers)}")
            if expert == SHARED and layer not in shared_layers:
                raise UserError(f"plan gives layer {layer} a shared expert; the model has none there")
            if expert != SHARED and not 0 <= expert < layers[layer]:
                raise UserError(f"plan names expert {expert} of layer {layer}, which has {layers[layer]} experts")
