"""What one weight matrix is quantized to: bit-width, group size, symmetry."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_BITS = (2, 3, 4, 6, 8, 16)
SCALE_BITS = 16  # one fp16 scale per group


@dataclass(frozen=True)
class QSpec:
    bits: int
    group_size: int = 128   # input columns sharing a scale/zero; -1 = one group per row
    sym: bool = False

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bit-width {self.bits}; choose one of {SUPPORTED_BITS}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1 (per row), got {self.group_size}")

    @property
    def is_float(self) -> bool:
        return self.bits == 16

    @property
    def name(self) -> str:
        """int4-g128-asym, int3-row-sym, fp16: for file names and tags (never parsed back)."""
        if self.is_float:
            return "fp16"
        group = "row" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits}-{group}-{'sym' if self.sym else 'asym'}"

    def storage_bits(self, rows: int, cols: int) -> int:
        """Bits to store a [rows, cols] matrix: codes plus each group's fp16 scale (and b-bit zero)."""
        if self.is_float:
            return 16 * rows * cols
        group = cols if self.group_size == -1 else self.group_size
        groups = rows * -(-cols // group)
        per_group = SCALE_BITS + (0 if self.sym else self.bits)
        return self.bits * rows * cols + groups * per_group
