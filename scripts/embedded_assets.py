"""Unpack (default) or pack the embedded models' compressed files (dynamo/assets.py).

    python scripts/embedded_assets.py                 # unpack what is missing or stale (import dynamo does it too)
    python scripts/embedded_assets.py pack DIR...     # compress DIR/model.safetensors and DIR/tokenizer.json to .xz
"""

from __future__ import annotations

import sys
from pathlib import Path

from dynamo.assets import ensure_unpacked, pack


def main(argv: list[str]) -> int:
    if argv[:1] == ["pack"]:
        for folder in argv[1:]:
            for path in pack(Path(folder)):
                print(f"{path}: {path.stat().st_size} bytes (from {path.with_suffix('').stat().st_size})")
        return 0
    for path in ensure_unpacked():
        print(f"unpacked {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
