"""Datasets: shipped domains, users' files, hub failures, and the corpus split."""

from __future__ import annotations

import json

import pytest

from dynamo.config import DatasetConfig, SourceConfig, SourceKind
from dynamo.data import EMBEDDED_DIR, embedded_split, known_datasets, load_documents, sources_of
from dynamo.errors import UserError
from dynamo.testbed.corpora import split_documents

DOMAINS = ["code", "docs", "speeches", "literature", "email", "legal", "math", "chat"]


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_domain_ships_disjoint_calib_and_test_splits(domain):
    source = SourceConfig(kind=SourceKind.embedded, path=domain)
    calib, test = load_documents(source, "calib"), load_documents(source, "test")
    assert calib and test
    assert not set(calib) & set(test), "a document is in both splits"
    size = sum(len(d.encode()) for d in calib + test)
    assert 50_000 < size < 600_000, "splits are meant to be a few hundred KB"


def test_manifest_matches_the_shipped_files():
    import hashlib

    manifest = json.loads((EMBEDDED_DIR / "manifest.json").read_text())
    assert sorted(manifest["domains"]) == sorted(DOMAINS)
    for domain, entry in manifest["domains"].items():
        for split in ("calib", "test"):
            data = (EMBEDDED_DIR / domain / f"{split}.jsonl").read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry[split]["sha256"], f"{domain}/{split} changed"


def test_embedded_split_is_read_from_the_suite_config(tmp_path):
    known, novel = embedded_split()
    assert known == ["code", "docs", "speeches", "literature"] and sorted(known + novel) == sorted(DOMAINS)
    suite = tmp_path / "suite.yaml"
    suite.write_text("known: [code]\nsources: {code: {path: code}, chat: {path: chat}, math: {path: math}}\n")
    assert embedded_split(suite) == (["code"], ["chat", "math"])  # novel: the other sources, in config order
    suite.write_text("known: [code, poems]\nsources: {code: {path: code}}\n")
    with pytest.raises(UserError, match=r"known names \['poems'\]"):
        embedded_split(suite)


def test_split_is_by_document_and_deterministic():
    docs = [f"document {i}\n" + "x" * (i % 50) for i in range(400)]
    a, b = split_documents(docs), split_documents(docs)
    assert a == b
    assert not set(a["test"]) & set(a["calib"]) and not set(a["test"]) & set(a["train"])
    assert len(a["test"]) + len(a["calib"]) + len(a["train"]) == len(docs)
    assert split_documents(docs, seed=1) != a


def test_local_jsonl_holds_the_head_for_calibration(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(8)))
    source = SourceConfig(kind=SourceKind.local, path=str(path))
    assert load_documents(source, "calib") == ["doc 0", "doc 1"]
    assert load_documents(source, "test") == [f"doc {i}" for i in range(2, 8)]


def test_local_txt_documents_are_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first para\nstill first\n\nsecond\n\n\nthird\n")
    source = SourceConfig(kind=SourceKind.local, path=str(path), calib_path=str(path))
    assert load_documents(source, "test") == ["first para\nstill first", "second", "\nthird\n"]


def test_dataset_path_adds_a_source_to_any_suite(tmp_path):
    path = tmp_path / "extra.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n")
    cfg = DatasetConfig(name="code", sources={"code": SourceConfig(path="code")}, path=str(path))
    assert list(sources_of(cfg)) == ["code", "extra"]
    assert sources_of(cfg)["extra"].kind == SourceKind.local


@pytest.mark.parametrize("content,match", [
    ("", "no text"),
    ("\n\n", "no text"),
    ('{"body": "x"}\n{"body": "y"}\n', "field 'text'"),
    ("not json\n", "JSON object"),
])
def test_bad_local_files_get_one_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        load_documents(SourceConfig(kind=SourceKind.local, path=str(path), calib_path=str(path)), "test")


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_documents(SourceConfig(kind=SourceKind.local, path=str(tmp_path / "nope.jsonl")), "test")
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(UserError, match="unsupported file type"):
        load_documents(SourceConfig(kind=SourceKind.local, path=str(tmp_path / "x.parquet"),
                                    calib_path=str(tmp_path / "x.parquet")), "test")
    with pytest.raises(UserError, match="embedded domain must be one of"):
        load_documents(SourceConfig(kind=SourceKind.embedded, path="klingon"), "test")


def test_unreachable_hub_dataset_is_one_line():
    source = SourceConfig(kind=SourceKind.hub, path="Salesforce/wikitext", name="wikitext-2-raw-v1",
                          calib_split="train", test_split="test")
    with pytest.raises(UserError, match="hub") as err:
        load_documents(source, "test")
    assert "\n" not in str(err.value)


def test_dataset_path_with_its_own_calibration_file(tmp_path):
    test, calib = tmp_path / "mine.jsonl", tmp_path / "mine_calib.jsonl"
    test.write_text(json.dumps({"text": "evaluate me"}) + "\n")
    calib.write_text(json.dumps({"text": "profile me"}) + "\n")
    cfg = DatasetConfig(name="local", path=str(test), calib_path=str(calib))
    source = sources_of(cfg)["mine"]
    assert load_documents(source, "calib") == ["profile me"] and load_documents(source, "test") == ["evaluate me"]


def test_known_datasets_fall_back_to_the_users_file_or_the_only_source(tmp_path):
    from omegaconf import OmegaConf

    def suite(**fields):
        return OmegaConf.merge(OmegaConf.structured(DatasetConfig), {"name": "s", **fields})

    one = {"wikitext2": {"kind": "hub", "path": "Salesforce/wikitext"}}
    two = {"code": {"path": "code"}, "chat": {"path": "chat"}}
    assert known_datasets(suite(sources=one)) == ["wikitext2"]
    assert known_datasets(suite(sources=two)) == []
    assert known_datasets(suite(sources=two, known=["chat"])) == ["chat"]
    assert known_datasets(suite(path=str(tmp_path / "mine.jsonl"))) == ["mine"]


@pytest.mark.parametrize("content,message", [
    (b"\x7fELF\x02\x01\x00\x00binary", "a binary file, not text"),
    ("caf\u00e9 cr\u00e8me, na\u00efve fa\u00e7ade\n\nmore".encode("latin-1"), "not UTF-8 text (it looks like"),
    (b'{"text": ["a", "list"]}\n', "expected a JSON object with a string field 'text'"),
])
def test_files_that_are_not_utf8_text_are_refused_in_one_line(tmp_path, content, message):
    path = tmp_path / ("data.jsonl" if content.startswith(b"{") else "data.txt")
    path.write_bytes(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_documents(SourceConfig(kind=SourceKind.local, path=str(path), calib_path=str(path)), "test")


def test_crlf_txt_documents_and_a_utf8_bom_read_like_plain_files(tmp_path):
    """Windows files (issue 29): CRLF paragraphs were one document ('needs at least 2 documents'), and a
    byte-order mark made line 1 of a .jsonl 'not a JSON object'."""
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"first paragraph\r\nstill first\r\n\r\nsecond\r\n\r\nthird\r\n")
    source = SourceConfig(kind=SourceKind.local, path=str(crlf), calib_fraction=0.34)
    assert load_documents(source, "calib") == ["first paragraph\nstill first"]
    assert load_documents(source, "test") == ["second", "third\n"]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"text": "one"}\r\n{"text": "two"}\r\n')
    source = SourceConfig(kind=SourceKind.local, path=str(bom), calib_fraction=0.5)
    assert load_documents(source, "calib") == ["one"] and load_documents(source, "test") == ["two"]


def test_a_fifo_is_refused_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="is not a regular file"):
        load_documents(SourceConfig(kind=SourceKind.local, path=str(fifo)), "test")
