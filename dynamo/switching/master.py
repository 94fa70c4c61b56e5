"""What the adaptive switch restores from: the routed experts' weights before quantization.

Two places, one interface (`get(key)` -> the [out, in] matrix on the host, in its stored dtype):
- `ExpertMaster` (`quant.switching.master=host`): a copy taken before quantization, in the
  model's own dtype (bf16 stays bf16: one more copy of the experts in host RAM, 84 GiB for
  Mixtral-8x7B);
- `DiskMaster` (`quant.switching.master=disk`): read slice by slice from the checkpoint's
  safetensors files when a switch needs them (safetensors reads a slice without loading the
  file, through the page cache), so a switch costs no resident host copy at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapters import PROJECTIONS, moe_layers
from ..errors import UserError
from .store import Key

VALUE_BYTES = 2  # the slot budget is a share of the experts' bytes at 16 bits


def _check_against(master, model) -> None:
    for layer in moe_layers(model):
        for e in range(layer.n_experts):
            for p in PROJECTIONS:
                shape = master.shape((layer.index, e, p))
                if shape is None or tuple(shape) != layer.shape(p):
                    raise UserError(f"the switch's master copy does not match the model at layer {layer.index} "
                                    f"expert {e} {p} ({master.location})")


class ExpertMaster:
    """Copies of every routed expert's weights in host memory, taken before quantization, in the model's dtype."""

    location = "host"

    def __init__(self, model, dtype: torch.dtype | None = None):
        self.weights: dict[Key, torch.Tensor] = {}
        for layer in moe_layers(model):
            for e in range(layer.n_experts):
                for p in PROJECTIONS:
                    w = layer.weight(e, p).detach()
                    self.weights[(layer.index, e, p)] = w.to("cpu", dtype or w.dtype, copy=True)

    def get(self, key: Key) -> torch.Tensor:
        return self.weights[key]

    def shape(self, key: Key) -> tuple[int, int] | None:
        w = self.weights.get(key)
        return None if w is None else tuple(w.shape)

    def keys(self):
        return self.weights.keys()

    @property
    def nbytes(self) -> int:
        """Host bytes this master holds."""
        return sum(t.numel() * t.element_size() for t in self.weights.values())

    @property
    def fp16_nbytes(self) -> int:
        """The routed experts' weights at 2 bytes each: what the slot budget is a share of."""
        return sum(t.numel() for t in self.weights.values()) * VALUE_BYTES

    def validate(self, model) -> None:
        _check_against(self, model)


class DiskMaster:
    """The routed experts read by slice from a checkpoint folder's safetensors files.

    Finds each matrix under the names transformers saves: per expert
    (`<experts>.<e>.<p>_proj.weight`) or fused (`<experts>.gate_up_proj` [E, 2I, H] and
    `<experts>.down_proj` [E, H, I]), where `<experts>` is the experts module's path in the model.
    """

    def __init__(self, path: str | Path, model):
        from safetensors import safe_open

        self.path = Path(path)
        files = sorted(self.path.glob("*.safetensors"))
        if not self.path.is_dir() or not files:
            raise UserError(f"quant.switching.master=disk needs a local checkpoint folder with safetensors files; "
                            f"{self.path} has none (use quant.switching.master=host)")
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            names = {name: self.path / file for name, file in weight_map.items()}
        else:
            names = {}
            for file in files:
                with safe_open(str(file), "pt") as f:
                    names.update({name: file for name in f.keys()})
        self._files: dict[Path, object] = {}
        self._names = names
        module_names = {id(m): n for n, m in model.named_modules()}
        self._where: dict[Key, tuple[str, int | None, slice | None]] = {}
        self._shapes: dict[Key, tuple[int, int]] = {}
        for layer in moe_layers(model):
            prefix = module_names[id(layer.experts)]
            inter = layer.intermediate_size
            for e in range(layer.n_experts):
                for p in PROJECTIONS:
                    single = f"{prefix}.{e}.{p}_proj.weight"
                    if single in names:
                        self._where[(layer.index, e, p)] = (single, None, None)
                    elif p == "down" and f"{prefix}.down_proj" in names:
                        self._where[(layer.index, e, p)] = (f"{prefix}.down_proj", e, None)
                    elif p != "down" and f"{prefix}.gate_up_proj" in names:
                        rows = slice(0, inter) if p == "gate" else slice(inter, 2 * inter)
                        self._where[(layer.index, e, p)] = (f"{prefix}.gate_up_proj", e, rows)
                    else:
                        raise UserError(f"quant.switching.master=disk: {self.path} holds no weights for layer "
                                        f"{layer.index} expert {e} {p} (looked for '{single}' and the fused "
                                        f"'{prefix}.gate_up_proj'/'down_proj'); use quant.switching.master=host")
                    name, expert, rows = self._where[(layer.index, e, p)]
                    stored = self._file(name).get_slice(name).get_shape()
                    if expert is not None:
                        stored = stored[1:]
                    if rows is not None:
                        stored = [rows.stop - rows.start if stored[0] >= rows.stop else -1, stored[1]]
                    self._shapes[(layer.index, e, p)] = tuple(int(s) for s in stored)
        self.location = f"disk:{self.path}"

    def _file(self, name: str):
        from safetensors import safe_open

        file = self._names[name]
        if file not in self._files:
            self._files[file] = safe_open(str(file), "pt")
        return self._files[file]

    def get(self, key: Key) -> torch.Tensor:
        name, expert, rows = self._where[key]
        tensor = self._file(name).get_slice(name)
        if expert is None:
            return tensor[:, :]
        if rows is None:
            return tensor[expert]
        return tensor[expert, rows]

    def shape(self, key: Key) -> tuple[int, int] | None:
        return self._shapes.get(key)

    def keys(self):
        return self._where.keys()

    @property
    def nbytes(self) -> int:
        return 0  # nothing resident: slices are read when a switch needs them

    @property
    def fp16_nbytes(self) -> int:
        return sum(a * b for a, b in self._shapes.values()) * VALUE_BYTES

    def validate(self, model) -> None:
        _check_against(self, model)
