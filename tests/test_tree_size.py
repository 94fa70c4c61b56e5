"""The tracked tree stays small enough to travel to a borrowed GPU machine, and the embedded models' compressed
weights unpack to exactly the bytes the committed records were measured on."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIMIT = 52 * 2**20  # bytes: a GPU machine receives 64 MiB, and the device check's files need the rest


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / name for name in out.decode().split("\0") if name]


def test_tracked_tree_is_at_most_52_mib():
    files = _tracked_files()
    sizes = {p: p.lstat().st_size for p in files if os.path.lexists(p)}
    total = sum(sizes.values())
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    assert total <= LIMIT, (f"tracked tree {total / 2**20:.2f} MiB > {LIMIT / 2**20:.0f} MiB; largest: "
                            + ", ".join(f"{p.relative_to(REPO)} {s / 2**20:.1f} MiB" for p, s in largest))


def test_no_plain_embedded_weights_are_tracked():
    """The weights are tracked only as .xz (dynamo/assets.py); a retrained model is packed before it is added."""
    from dynamo.assets import PACKED

    tracked = {p.relative_to(REPO).as_posix() for p in _tracked_files()}
    plain = sorted(t for t in tracked if t.startswith("assets/models/") and t.rsplit("/", 1)[-1] in PACKED)
    assert not plain, f"commit these as .xz (python scripts/embedded_assets.py pack DIR): {plain}"


def test_every_embedded_model_unpacks_to_its_archive(tmp_path):
    """import dynamo unpacked them; each equals its archive's content (and a stale one is rewritten)."""
    import dynamo  # noqa: F401
    from dynamo.assets import archives, ensure_unpacked

    found = archives()
    assert {p.parent.name for p in found} >= {"tiny-olmoe", "tiny-qwen-moe", "testbed-qwen-moe"}
    for archive in found:
        with lzma.open(archive) as z:
            digest = hashlib.file_digest(z, "sha256").hexdigest()
        with open(archive.with_suffix(""), "rb") as f:
            assert hashlib.file_digest(f, "sha256").hexdigest() == digest, archive
    config = json.loads((found[0].parent / "config.json").read_text())
    assert config["model_type"]

    # a copy: missing and stale plain files are (re)written, fresh ones left alone
    root = tmp_path / "models"
    (root / "m").mkdir(parents=True)
    with lzma.open(root / "m" / "model.safetensors.xz", "wb") as z:
        z.write(b"weights")
    assert ensure_unpacked(root) == [root / "m" / "model.safetensors"]
    assert (root / "m" / "model.safetensors").read_bytes() == b"weights"
    assert ensure_unpacked(root) == []
    os.utime(root / "m" / "model.safetensors", (0, 0))
    assert ensure_unpacked(root) == [root / "m" / "model.safetensors"]
