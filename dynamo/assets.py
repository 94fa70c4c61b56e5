"""The embedded models' large files are committed xz-compressed and unpacked beside themselves on first use.

The repository must stay small enough to travel to a borrowed GPU machine (the tracked tree <= 52 MiB,
tests/test_tree_size.py). The embedded checkpoints are already fp16, so their weights are stored losslessly
compressed instead: `assets/models/<name>/model.safetensors.xz` (LZMA2 with lc=0, lp=1, pb=1: literals
aligned to the 2-byte fp16 values, ~15 % smaller than the raw file) and the tokenizer copy
`tokenizer.json.xz`. `import dynamo` unpacks any that is missing or older than its archive (a stat per
file otherwise), atomically, so every path that names `assets/models/<name>` (Hydra configs, scripts, tests,
`from_pretrained`) finds the plain files; the unpacked files are git-ignored. The bytes are exactly the
committed ones (xz checks a CRC64), so every number measured on them stands.

    python scripts/embedded_assets.py                 # unpack now (what `import dynamo` does)
    python scripts/embedded_assets.py pack DIR...     # after scripts/train_embedded.py: compress DIR's large
                                                      # files (then `git add DIR/*.xz`; the plain files stay ignored)
"""

from __future__ import annotations

import lzma
import os
import tempfile
import warnings
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parents[1] / "assets" / "models"
PACKED = ("model.safetensors", "tokenizer.json")  # the files of an embedded model that are stored compressed
FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9, "lc": 0, "lp": 1, "pb": 1}]  # `xz -d` reads it too


def archives(root: Path = MODELS_DIR) -> list[Path]:
    return sorted(p for name in PACKED for p in root.glob(f"*/{name}.xz"))


def _stale(archive: Path, target: Path) -> bool:
    return not target.exists() or target.stat().st_mtime < archive.stat().st_mtime


def unpack(archive: Path) -> Path:
    """archive (X.xz) -> X beside it, written to a temporary file and renamed (concurrent callers are safe)."""
    target = archive.with_suffix("")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=archive.parent)
    try:
        with os.fdopen(fd, "wb") as out, lzma.open(archive, "rb") as src:
            while chunk := src.read(1 << 22):
                out.write(chunk)
        os.chmod(tmp, archive.stat().st_mode & 0o777)  # as readable as the checkout (mkstemp makes it 0600)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def ensure_unpacked(root: Path = MODELS_DIR) -> list[Path]:
    """Unpack every archive whose plain file is missing or older; returns what was written."""
    written = []
    for archive in archives(root):
        target = archive.with_suffix("")
        if _stale(archive, target):
            try:
                written.append(unpack(archive))
            except OSError as err:  # a read-only checkout: say so once, the load will name the missing file
                warnings.warn(f"could not unpack {archive}: {err}", stacklevel=2)
    return written


def pack(folder: Path) -> list[Path]:
    """Compress folder's PACKED files to X.xz (lossless); the plain files stay (git-ignored)."""
    out = []
    for name in PACKED:
        src = folder / name
        if src.is_file():
            dst = src.with_name(src.name + ".xz")
            with open(src, "rb") as f, lzma.open(dst, "wb", format=lzma.FORMAT_XZ, filters=FILTERS) as z:
                while chunk := f.read(1 << 22):
                    z.write(chunk)
            os.utime(src)  # the plain file is not older than its archive
            out.append(dst)
    return out
