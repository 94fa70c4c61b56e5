"""Every kernel specialization the harness launches compiles for sm_80 and sm_90 (PTX + cubin) on the CPU.

A fast subset runs by default; all of them (hundreds, ~1 s each) under the `compile_all` marker:

    python -m pytest -q -m compile_all tests/kernels/test_compile.py
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from dynamo_kernels.packing import PACKED_BITS
from dynamo_kernels.specializations import (DTYPES, KERNEL_PATHS, TARGETS, Specialization, compile_specialization,
                                            enumerate_specializations, expert_shape, occupancy)

REPO = Path(__file__).resolve().parents[2]
SHAPES = [expert_shape(p.stem, json.loads(p.read_text())) for p in sorted((REPO / "assets" / "configs").glob("*.json"))]
ALL = enumerate_specializations(SHAPES)


def _fast_subset() -> list[Specialization]:
    """Per kernel and target: the two-plane widths (3, 6) in bf16 and fp16, per group and per row (the quick
    report in test_resource_report_quick adds 2-bit fp16 group 128)."""
    wanted = [(3, 128, "bf16"), (6, -1, "fp16")]
    picked = []
    for kernel in KERNEL_PATHS:
        for arch in TARGETS:
            for bits, group, dtype in wanted:
                picked.append(next(s for s in ALL if (s.kernel, s.arch, s.bits, s.group_size, s.dtype)
                                   == (kernel, arch, bits, group, dtype)))
    return picked


def _assert_compiles(spec: Specialization) -> None:
    compiled = compile_specialization(spec)
    assert compiled.asm["cubin"], spec.name
    assert f".target sm_{spec.arch}" in compiled.asm["ptx"], spec.name


def test_enumeration_covers_the_paper_models():
    """Both kernels, both targets, every packed width, both dtypes, every group size, every model's shapes."""
    assert {s.kernel for s in ALL} == set(KERNEL_PATHS)
    assert {s.arch for s in ALL} == set(TARGETS)
    assert {s.bits for s in ALL} == set(PACKED_BITS)
    assert {s.dtype for s in ALL} == set(DTYPES)
    assert {s.group_size for s in ALL} == {128, 64, -1}
    users = {u.split(":")[0] for s in ALL for u in s.used_by}
    assert users == {s.model for s in SHAPES} and len(users) == 6
    assert len({(s.kernel, s.arch, s.dtype, s.constexprs, s.signature) for s in ALL}) == len(ALL)  # deduplicated
    assert len({s.name for s in ALL}) == len(ALL)  # names tell them apart


def test_split_k_is_what_the_launcher_picks(monkeypatch):
    """The single-matrix kernel's SPLIT_K follows default_config on a GPU with the target's SM count."""
    from types import SimpleNamespace

    import torch

    from dynamo_kernels import triton_matmul as tm

    olmoe = next(s for s in SHAPES if s.model == "olmoe")
    spec = next(s for s in ALL if s.kernel == "dequant_matmul" and s.arch == 90 and "olmoe:down:1" in s.used_by)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(multi_processor_count=132))
    n, k = olmoe.projections["down"]
    w = object.__new__(tm.PackedWeight)
    for key, value in {"shape": (n, k), "bits": spec.bits, "group_size": spec.group_size}.items():
        object.__setattr__(w, key, value)
    cfg = tm.default_config(1, w, torch.device("cuda"))
    c = dict(spec.constexprs)
    assert (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) == (cfg.block_m, cfg.block_n, cfg.block_k)
    assert c["SPLIT_K"] == -(-k // (-(-(-(-k // cfg.split_k)) // cfg.block_k) * cfg.block_k)) > 1


@pytest.mark.parametrize("spec", _fast_subset(), ids=lambda s: s.name)
def test_fast_subset_compiles(spec):
    _assert_compiles(spec)


def test_a_compile_failure_names_the_specialization():
    good = next(s for s in ALL if s.kernel == "grouped_dequant_matmul")
    broken = Specialization(**{**good.__dict__,
                               "constexprs": tuple(sorted({**dict(good.constexprs), "BLOCK_K": 48}.items()))})
    with pytest.raises(RuntimeError, match=re.escape(broken.name)):  # tl.arange needs a power of two
        compile_specialization(broken)


def test_occupancy_arithmetic():
    # 255 registers round up to 256 a thread, 8192 a warp, 32768 a 4-warp program: 2 in 64K registers
    assert occupancy(90, 255, 0, 4)["programs_per_sm"] == 2
    assert occupancy(90, 255, 0, 4)["limited_by"] == "registers"
    # 86.5 KB of shared memory: 1 program on an A100 (164 KB), 2 on an H100 (228 KB)
    assert occupancy(80, 128, 86528, 4)["programs_per_sm"] == 1
    assert occupancy(90, 128, 86528, 4)["programs_per_sm"] == 2
    assert occupancy(80, 32, 0, 4)["programs_per_sm"] == 16  # threads: 2048 / 128


def _all_selected(config) -> bool:
    return "compile_all" in (config.getoption("markexpr") or "") or os.environ.get("DYNAMO_COMPILE_ALL") == "1"


@pytest.mark.compile_all
@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.name)
def test_every_specialization_compiles(spec, request):
    if not _all_selected(request.config):
        pytest.skip("hundreds of compiles: run with -m compile_all (or DYNAMO_COMPILE_ALL=1)")
    _assert_compiles(spec)


@pytest.mark.slow  # ptxas resource report, ~4 s
def test_resource_report_quick(tmp_path):
    """dynamo.bench.compiled (scripts/kernels_compiled.py) --quick: one specialization per kernel and target, resources read off the cubin."""
    from dynamo.bench.compiled import main

    out = tmp_path / "kc.json"
    assert main(["--quick", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["compiled"] == 2 * len(KERNEL_PATHS) and record["failed"] == 0
    for row in record["specializations"]:
        assert 0 < row["registers_per_thread"] <= 255
        assert row["spill_store_bytes"] is not None and row["shared_memory_bytes"] > 0
        assert row["programs_per_sm"] >= 1
        assert ("spill_reason" in row) == bool(row["spill_store_bytes"] or row["local_memory_bytes"])


@pytest.mark.slow  # compiles several specializations
def test_split_k_values_above_one_share_one_cubin():
    """Why the report compiles one SPLIT_K > 1 per class: the constant is only compared with 1 in the kernel."""
    spec = next(s for s in ALL if s.kernel == "dequant_matmul" and dict(s.constexprs)["SPLIT_K"] == 3)
    other = Specialization(**{**spec.__dict__, "constexprs": tuple(sorted({**dict(spec.constexprs),
                                                                            "SPLIT_K": 8}.items()))})
    assert compile_specialization(spec).asm["cubin"] == compile_specialization(other).asm["cubin"]


def test_readme_compile_table_is_the_committed_report():
    from dynamo.bench.compiled import readme_table

    path = REPO / "results" / "benchmarks" / "kernels_compiled.json"
    record = json.loads(path.read_text())
    assert record["failed"] == 0 and record["specializations_launched"] == len(ALL)
    assert sum(s["specializations"] for s in record["summary"].values()) == len(ALL)
    assert readme_table(record) in (REPO / "docs" / "scaling.md").read_text()
    for row in record["specializations"]:  # no spill without its reason
        assert ("spill_reason" in row) == bool(row["spill_store_bytes"] or row["local_memory_bytes"])
