"""Text datasets as lists of documents: embedded domains, a user's files, or hub datasets.

A dataset is configuration (conf/dataset/*.yaml), not code: each named source says where
its calibration and test documents come from. Every loader returns plain strings, so
evaluation and calibration never care where the text came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import yaml

from .config import REPO_ROOT, SourceConfig, SourceKind
from .errors import UserError

EMBEDDED_DIR = REPO_ROOT / "assets" / "data"
EMBEDDED_SUITE = REPO_ROOT / "conf" / "dataset" / "embedded.yaml"


class DomainSplit(NamedTuple):
    """The embedded domains the testbed models were trained on (known) and the others (novel), in config order."""

    known: list[str]
    novel: list[str]


def embedded_split(path: Path = EMBEDDED_SUITE) -> DomainSplit:
    """The known/novel split of the embedded suite, read from its config (conf/dataset/embedded.yaml)
    so that training, probes and benchmarks never type the domain names again."""
    suite = yaml.safe_load(path.read_text())
    known = list(suite["known"])
    missing = [d for d in known if d not in suite["sources"]]
    if missing:
        raise UserError(f"{path}: known names {missing}, which are not among its sources")
    return DomainSplit(known, [d for d in suite["sources"] if d not in known])


def local_source_name(dataset_cfg) -> str | None:
    """The name the user's `dataset.path` file gets among the suite's sources (None: no such file)."""
    if not dataset_cfg.path:
        return None
    stem = Path(dataset_cfg.path).expanduser().stem
    return stem if stem not in dataset_cfg.sources else f"local_{stem}"


def known_datasets(dataset_cfg) -> list[str]:
    """DynaMo's known datasets (what calibration and the analysis read, calib split only): the suite's
    own list; for a suite that declares none, the user's `dataset.path` file, else the suite's only
    source (dataset=wikitext2, dataset=code, ...: a one-dataset run calibrates on that dataset's
    calib split, as GPTQ's protocol does). Empty only for a multi-source suite without a list."""
    known = list(dataset_cfg.known)
    if not known and dataset_cfg.path:
        known = [local_source_name(dataset_cfg)]
    elif not known and len(dataset_cfg.sources) == 1:
        known = list(dataset_cfg.sources)
    return known


def sources_of(dataset_cfg) -> dict[str, SourceConfig]:
    """The named sources of a dataset suite, plus the user's file if `dataset.path` is set."""
    sources = dict(dataset_cfg.sources)
    if dataset_cfg.path:
        path = Path(dataset_cfg.path).expanduser()
        name = local_source_name(dataset_cfg)
        calib_path = getattr(dataset_cfg, "calib_path", None)
        calib = str(Path(calib_path).expanduser()) if calib_path else None
        sources[name] = SourceConfig(kind=SourceKind.local, path=str(path), calib_path=calib)
    if not sources:
        raise UserError(f"dataset '{dataset_cfg.name}' has no sources; give a file with dataset.path=/my/file.jsonl")
    return sources


def load_documents(source: SourceConfig, split: str) -> list[str]:
    """Documents of one split ("calib" or "test" role, mapped to the source's own split names)."""
    if split not in ("calib", "test"):
        raise UserError(f"unknown split '{split}': use calib or test")
    if source.kind == SourceKind.embedded:
        docs = _read_file(EMBEDDED_DIR / str(source.path) / f"{split}.jsonl", source.text_field)
    elif source.kind == SourceKind.local:
        docs = _local_split(source, split)
    else:
        docs = _hub_split(source, split)
    bad = next((d for d in docs if not isinstance(d, str)), "")
    if not isinstance(bad, str):
        raise UserError(f"{source.path} [{split}]: field '{source.text_field}' holds {type(bad).__name__} values, "
                        "not text; set text_field to a text column")
    docs = [d for d in docs if d.strip()]
    if source.max_documents is not None:
        docs = docs[: source.max_documents]
    if not docs:
        where = source.calib_path if source.kind == SourceKind.local and source.calib_path and split == "calib" \
            else source.path
        raise UserError(f"{where}: no text in the {split} split; check the file or its text field "
                        f"'{source.text_field}'")
    return docs


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; a binary file or another encoding is refused, naming what it looks like."""
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise UserError(f"{path}: a binary file, not text; give a UTF-8 .jsonl or .txt file")
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not text; with plain utf-8 it
        # became part of the first JSON line, refused as "expected a JSON object"
        text = raw.decode("utf-8-sig")
        # CRLF or CR line ends (Windows, old Mac): documents are split on blank lines, "\n\n"
        return text.replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as err:
        from charset_normalizer import from_bytes

        best = from_bytes(raw).best()
        guess = f" (it looks like {best.encoding})" if best is not None else ""
        raise UserError(f"{path}: not UTF-8 text{guess}: byte 0x{raw[err.start]:02x} at offset {err.start}; "
                        f"convert it, e.g. iconv -f {best.encoding if best else '<encoding>'} -t utf-8") from None


def _read_file(path: Path, text_field: str) -> list[str]:
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a data file (.jsonl with a '{text_field}' field, or .txt)")
    if path.exists() and not path.is_file():  # a FIFO or device: reading it would block or never end
        raise UserError(f"{path} is not a regular file (a pipe, socket or device); give a data file "
                        f"(.jsonl with a '{text_field}' field, or .txt)")
    if not path.is_file():
        raise UserError(f"data file not found: {path}; check the path (an embedded domain must be one of "
                        f"{sorted(p.name for p in EMBEDDED_DIR.iterdir() if p.is_dir())})")
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(_read_text(path).split("\n"), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                text = None
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: expected a JSON object with a string field "
                                f"'{text_field}' (set the field name with text_field)")
            docs.append(text)
        return docs
    if path.suffix in (".txt", ".md", ""):
        text = _read_text(path)
        return [block for block in text.split("\n\n") if block.strip()]
    raise UserError(f"{path}: unsupported file type '{path.suffix}'; use .jsonl (field 'text') or .txt")


def _local_split(source: SourceConfig, split: str) -> list[str]:
    if source.calib_path:
        path = source.calib_path if split == "calib" else source.path
        return _read_file(Path(path).expanduser(), source.text_field)
    docs = [d for d in _read_file(Path(str(source.path)).expanduser(), source.text_field) if d.strip()]
    if not docs:
        raise UserError(f"{source.path}: no text in the file; check the file or its text field '{source.text_field}'")
    if len(docs) < 2:
        raise UserError(f"{source.path}: needs at least 2 documents to hold some for calibration "
                        "(or give a separate calib_path)")
    head = max(1, int(len(docs) * source.calib_fraction))
    return docs[:head] if split == "calib" else docs[head:]


def _hub_split(source: SourceConfig, split: str) -> list[str]:
    import datasets

    hub_split = source.calib_split if split == "calib" else source.test_split
    data_files = source.calib_data_files if split == "calib" else source.test_data_files
    kwargs = {"split": hub_split}
    if data_files:
        kwargs.update(data_files={hub_split: data_files})
    try:
        ds = datasets.load_dataset(source.path, source.name, **kwargs)
    except Exception as err:  # the hub raises many types; the user needs the one line below
        raise UserError(f"could not load hub dataset {source.path}"
                        f"{'/' + source.name if source.name else ''} [{hub_split}]: "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
                        "Is the Hugging Face hub reachable (HF_HUB_OFFLINE unset)? Offline, use an embedded "
                        "domain or dataset.path=/my/file.jsonl") from None
    if source.text_field not in ds.column_names:
        raise UserError(f"hub dataset {source.path} has no column '{source.text_field}' "
                        f"(columns: {ds.column_names}); set text_field")
    return list(ds[source.text_field])
