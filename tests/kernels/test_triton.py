"""Triton kernels against their torch references: on CUDA directly, on CPU under Triton's interpreter.

The interpreter has to be switched on (TRITON_INTERPRET=1) before triton is first imported, and
in a full test run other modules import it long before this one (transformers does, building
models). So on a machine without CUDA, `test_kernels_under_interpreter` runs this file again in
a subprocess with the variable set, and the kernel tests here are skipped in the parent process;
no other test module ever sees the variable. On a CUDA machine the same tests run the compiled
kernels in-process. Every launch writes into an output poisoned with NaN, so a missed element fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from dynamo_kernels.dispatch import backend_for, dequant_matmul, moe_experts
from dynamo_kernels.experts import Routing
from dynamo_kernels.packing import PACKED_BITS, WORD_BITS, plane_bits
from dynamo_kernels.reference import dequant_matmul_ref, grouped_dequant_matmul_ref, moe_experts_ref
from random_experts import random_experts, random_weight, skewed_routing

REPO = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2}  # max |error| / max |reference|

kernel_test = pytest.mark.skipif(not (CUDA or INTERPRETED),
                                 reason="runs in the TRITON_INTERPRET=1 subprocess (test_kernels_under_interpreter)")
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def poisoned(*shape: int, dtype: torch.dtype, device: str = DEVICE) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def fresh_gen(*key: object) -> torch.Generator:
    """A generator per test case: fresh inputs for each, the same ones on every run."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


# --- kernels (CUDA, or the interpreter subprocess) -----------------------------------------


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group_size", [-1, 32, 24])  # per row; tiles inside a group; groups across tiles
@pytest.mark.parametrize("bits", PACKED_BITS)
def test_dequant_matmul_matches_reference(bits, group_size, dtype):
    from dynamo_kernels.triton_matmul import dequant_matmul_triton

    gen = fresh_gen(bits, group_size, dtype)
    m, n, k = (1 + bits % 5), 40, 101  # K is a multiple of no pack factor, N of no block
    w = random_weight(n, k, bits, gen, group_size).to(DEVICE)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    y = dequant_matmul_triton(x, w, out=poisoned(m, n, dtype=dtype))
    assert rel_err(y, dequant_matmul_ref(x, w)) <= TOLERANCE[dtype]


def _fast_only(fast, values):
    """Parameters with all but `fast` marked slow: the fast tier keeps one case of an interpreted test that
    takes seconds per case."""
    return [v if v == fast else pytest.param(v, marks=pytest.mark.slow) for v in values]


@kernel_test
@pytest.mark.parametrize("bits", _fast_only(3, PACKED_BITS))  # 3: codes that straddle 32-bit words
def test_zeros_over_several_words_and_tiles(bits):
    """72 zeros per group (more than one word in every plane, the last one padded) read by 3 column
    tiles, in 21 groups, with per-column and per-element zero loads."""
    from dynamo_kernels.triton_matmul import TileConfig, dequant_matmul_triton

    gen = fresh_gen("zeros", bits)
    w = random_weight(72, 333, bits, gen, 16).to(DEVICE)
    x = torch.randn(2, 333, generator=gen).to(DEVICE)
    ref = dequant_matmul_ref(x, w)
    for config in (TileConfig(16, 32, 16), TileConfig(16, 32, 64)):  # tile inside a group; 4 groups per tile
        y = dequant_matmul_triton(x, w, out=poisoned(2, 72, dtype=torch.float32), config=config)
        assert rel_err(y, ref) <= TOLERANCE[torch.float32], config


@kernel_test
@pytest.mark.parametrize("bits", _fast_only(3, [3, 8]))
def test_split_k_and_a_full_decode_batch(bits):
    from dynamo_kernels.triton_matmul import TileConfig, dequant_matmul_triton

    gen = fresh_gen("split", bits)
    w = random_weight(40, 230, bits, gen, 32).to(DEVICE)
    x = torch.randn(64, 230, generator=gen).to(DEVICE)
    ref = dequant_matmul_ref(x, w)
    for config in (TileConfig(64, 64, 32, split_k=3), TileConfig(16, 32, 32, split_k=1)):
        y = dequant_matmul_triton(x, w, out=poisoned(64, 40, dtype=torch.float32), config=config)
        assert rel_err(y, ref) <= TOLERANCE[torch.float32], config


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_kernel_matches_reference(dtype):
    from dynamo_kernels.triton_matmul import grouped_dequant_matmul_triton

    gen = fresh_gen("grouped", dtype)
    hidden, inter, tokens, k = 48, 40, 20, 3
    experts = random_experts([3, 3, 3, 6, 3, 3], hidden, inter, gen, device=DEVICE)
    index, _ = skewed_routing(tokens, 6, k, gen)  # expert 0: 20 rows (2 blocks of 16), expert 5: none
    routing = Routing.build(index.to(DEVICE), 6)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    stack = next(s for s in experts.stages["gate_up"] if s.bits == 3)  # gate and up: two column offsets
    got = grouped_dequant_matmul_triton(x, stack, routing, k, poisoned(tokens * k, 2 * inter, dtype=dtype))
    ref = grouped_dequant_matmul_ref(x, stack, routing, k, poisoned(tokens * k, 2 * inter, dtype=dtype))
    routed_here = torch.isin(index.view(-1).to(DEVICE), stack.experts)
    assert got[~routed_here].isnan().all(), "rows of other experts must stay untouched"
    assert not got[routed_here].isnan().any()
    assert rel_err(got[routed_here], ref[routed_here]) <= TOLERANCE[dtype]


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_layer_matches_reference(dtype):
    gen = fresh_gen("moe", dtype)
    hidden, inter, tokens, k = 48, 40, 10, 3
    experts = random_experts([2, 3, 4, 6, 8, 16, 4], hidden, inter, gen, device=DEVICE)
    index, weights = skewed_routing(tokens, 7, k, gen)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    index, weights = index.to(DEVICE), weights.to(DEVICE)
    assert backend_for(x.device) == "triton"
    got = moe_experts(experts, x, index, weights)
    assert got.dtype == dtype and not got.isnan().any()
    assert rel_err(got, moe_experts_ref(experts, x, index, weights)) <= TOLERANCE[dtype]


@kernel_test
def test_dispatcher_runs_the_kernel_here():
    from dynamo_kernels.triton_matmul import dequant_matmul_triton

    gen = fresh_gen("dispatch")
    w = random_weight(24, 50, 4, gen).to(DEVICE)
    x = torch.randn(2, 3, 50, generator=gen).to(DEVICE)
    assert torch.equal(dequant_matmul(x, w), dequant_matmul_triton(x, w))


@pytest.mark.slow  # a whole model under the interpreter; the grouped kernel alone is checked above
@kernel_test
def test_packed_model_runs_the_grouped_kernels():
    """The tiny OLMoE, packed with mixed widths, through the model's forward on the Triton path."""
    from dynamo.packed.model import packed_forward
    from test_packed_model import packed_and_fake

    model, packed, fake, ids = packed_and_fake("olmoe")
    model.to(DEVICE)
    packed = {i: p.to(DEVICE) for i, p in packed.items()}
    with torch.no_grad(), packed_forward(model, packed, backend="triton"):
        logits = model(ids.to(DEVICE)).logits
    assert rel_err(logits, fake.to(DEVICE)) <= TOLERANCE[torch.float32]


@pytest.mark.slow
@kernel_test
def test_attached_packed_model_with_channel_rows_runs_the_grouped_kernels():
    """DQS channel rows patched over the grouped kernels' outputs, through an attached model's forward,
    before and after a switch, against the fake-quantized model."""
    from test_packed_switching import LOW, NEW, dense_and_packed, tokens  # puts tests/switching on the path

    s, dense_sw, packed_sw = dense_and_packed("olmoe")
    s.model.to(DEVICE)
    ids = tokens(LOW, 2, 16, seed=9)

    def check() -> None:
        with torch.no_grad():
            got, want = s.model(ids.to(DEVICE)).logits, dense_sw.model(ids).logits
        assert rel_err(got.cpu(), want) <= TOLERANCE[torch.float32]

    check()
    new = tokens(NEW, 4, 16, seed=5)
    assert packed_sw.switch_to(new).widths == dense_sw.switch_to(new).widths
    check()


# --- host side, in the parent process ------------------------------------------------------


def test_block_table_cuts_each_experts_rows_into_blocks():
    from dynamo_kernels.triton_matmul import block_table

    gen = fresh_gen("table")
    experts = random_experts([4, 4, 4], 16, 16, gen)
    index = torch.tensor([[0, 1]] * 5 + [[1, 0]] * 2)  # expert 0: 7 rows, expert 1: 7 rows, expert 2: none
    routing = Routing.build(index, 3)
    stack = experts.stages["gate_up"][0]  # slots: gate 0, 1, 2 then up 0, 1, 2
    rows, slot, col = block_table(stack, routing, block_m=4)
    assert slot.tolist() == [0, 0, 1, 1, 3, 3, 4, 4] and col.tolist() == [0, 0, 0, 0, 16, 16, 16, 16]
    assert rows.shape == (8, 4) and (rows == -1).sum() == 4 * 1  # each expert: 7 rows in 2 blocks of 4
    assert sorted(rows[:2][rows[:2] >= 0].tolist()) == routing.rows_of(0).tolist()


def test_tolerances_catch_plausible_kernel_bugs():
    """The checks above can fail: a wrong shift, a lost high plane, a wrong group or a missing zero all exceed them."""
    gen = fresh_gen("bugs")
    w = random_weight(40, 101, 3, gen, 32)
    x = torch.randn(4, 101, generator=gen)
    ref = dequant_matmul_ref(x, w)
    codes, low = w.unpack().long(), plane_bits(3)[0]
    per_word, columns = WORD_BITS // low, torch.arange(101)
    next_field = ((columns // per_word) * per_word + (columns % per_word + 1) % per_word).clamp(max=100)
    wrong_low = (codes[:, next_field] & (2 ** low - 1)) | (codes & ~(2 ** low - 1))  # low bits of the next field
    groups = columns // 32
    scales, zeros = w.scales.float(), w.zero_points().float()
    bugs = {"field": scales[:, groups] * (wrong_low.float() - zeros[:, groups]),
            "high plane": scales[:, groups] * ((codes & (2 ** low - 1)).float() - zeros[:, groups]),
            "group": scales[:, (groups + 1) % 4] * (codes.float() - zeros[:, (groups + 1) % 4]),
            "zero": scales[:, groups] * codes.float()}
    for name, bad in bugs.items():
        assert rel_err(x @ bad.T, ref) > 10 * TOLERANCE[torch.float16], name


@pytest.mark.skipif(CUDA or INTERPRETED, reason="checks the CPU-without-interpreter path")
def test_kernels_refuse_cpu_tensors_without_the_interpreter():
    from dynamo_kernels.triton_matmul import dequant_matmul_triton

    w = random_weight(16, 32, 4, fresh_gen("refuse"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dequant_matmul_triton(torch.randn(1, 32), w)


@pytest.mark.slow  # ptxas on four kernels, ~10 s
@pytest.mark.skipif(INTERPRETED, reason="compiles the real kernels (the interpreter builds none)")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_kernels_compile_for_hopper():
    """Both kernels lower to sm_90 machine code (ptxas included) without a GPU: catches what the interpreter cannot."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dynamo_kernels import triton_matmul as tm

    common = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*i32", "y_ptr": "*fp32"}
    single = {**common, **dict.fromkeys(["M", "N", "K", "k_per_split", "stride_xm", "stride_qn", "stride_sn",
                                         "stride_zg", "stride_ym"], "i32")}
    grouped = {**common, "y_ptr": "*fp16", "rows_ptr": "*i32", "block_slot_ptr": "*i32", "block_col_ptr": "*i32",
               **dict.fromkeys(["N", "K", "in_div", "stride_xm", "stride_qs", "stride_qn", "stride_ss", "stride_sn",
                                "stride_zs", "stride_zg", "stride_ym"], "i32")}
    tiles = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "DOT_PRECISION": "tf32"}
    cases = [(tm._dequant_matmul_kernel, single, {**tiles, **tm._plane_constexprs(3), "GROUP": 128, "SPLIT_K": 4}),
             (tm._grouped_dequant_matmul_kernel, grouped, {**tiles, **tm._plane_constexprs(6), "GROUP": 128}),
             (tm._dequant_matmul_kernel, single, {**tiles, **tm._plane_constexprs(4), "GROUP": 0, "SPLIT_K": 1}),
             (tm._grouped_dequant_matmul_kernel, grouped, {**tiles, **tm._plane_constexprs(3), "GROUP": 24})]
    for kernel, signature, constexprs in cases:
        signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]


@pytest.mark.skipif(CUDA or INTERPRETED, reason="the kernel tests run in this process")
def test_kernels_under_interpreter(request):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    parent_only = "not under_interpreter and not compile_for_hopper and not without_the_interpreter"
    tier = request.config.getoption("markexpr")  # -m "not slow" here leaves the slow kernel cases out there too
    marks = f"not gpu and ({tier})" if tier else "not gpu"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marks,
                           "-k", parent_only, str(Path(__file__))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "passed" in summary and "skipped" not in summary, summary  # every kernel test really ran


# --- GPU only --------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("bits", PACKED_BITS)
def test_gpu_expert_projection_shapes(bits):
    """OLMoE (2048, 1024) and Qwen1.5-MoE / DeepSeek-MoE (2048, 1408) projections, decode batches, fp16."""
    from dynamo_kernels.triton_matmul import dequant_matmul_triton

    gen = fresh_gen("gpu", bits)
    for n, k in ((1024, 2048), (2048, 1024), (1408, 2048), (2048, 1408)):
        w = random_weight(n, k, bits, gen, 128).to("cuda")
        for m in (1, 4, 16, 64):
            x = torch.randn(m, k, generator=gen).to("cuda", torch.float16)
            y = dequant_matmul_triton(x, w, out=poisoned(m, n, dtype=torch.float16))
            assert rel_err(y, dequant_matmul_ref(x, w)) <= TOLERANCE[torch.float16], (n, k, m)


@pytest.mark.gpu
@requires_cuda
def test_gpu_moe_layer_with_mixed_widths():
    gen = fresh_gen("gpu-moe")
    n_experts, k, tokens = 16, 8, 64
    experts = random_experts([(2, 3, 4, 6, 8)[e % 5] for e in range(n_experts)], 2048, 1024, gen, 128, "cuda")
    index = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(tokens)]).to("cuda")
    weights = torch.rand(tokens, k, generator=gen).softmax(-1).to("cuda")
    for m in (1, tokens):
        x = torch.randn(m, 2048, generator=gen).to("cuda", torch.float16)
        got = moe_experts(experts, x, index[:m], weights[:m], backend="triton")
        assert rel_err(got, moe_experts_ref(experts, x, index[:m], weights[:m])) <= TOLERANCE[torch.float16]
