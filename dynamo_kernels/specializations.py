"""Every kernel specialization the harness launches on the paper models, compiled without a GPU.

A Triton kernel is compiled once per distinct set of compile-time constants and argument dtypes
(a *specialization*). This module enumerates the ones `triton_matmul`'s launchers produce for the
routed experts of the six paper models (shapes from assets/configs/, passed in as `ExpertShape`),
and compiles each for a CUDA target (sm_80 = A100, sm_90 = H100) with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`: PTX, then ptxas to a cubin,
all on the CPU.

The constants come from the launchers' own heuristic (`triton_matmul.default_config`, called with
the target's multiprocessor count in place of the device's), so what is compiled here is what a
GPU would compile. One entry per kernel path in `KERNEL_PATHS`: a later path (the slot-table
kernel) is added there with its signature and the constants its launcher picks.

    specs = enumerate_specializations(shapes)          # [Specialization], deduplicated per target
    compiled = compile_specialization(spec)            # triton's CompiledKernel (asm["cubin"], n_regs...)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable
from unittest import mock

import torch

from .packing import PACKED_BITS

# Multiprocessor counts of the targets (NVIDIA A100 and H100 SXM5 datasheets / CUDA programming guide).
TARGETS = {80: {"name": "A100 (sm_80)", "sms": 108}, 90: {"name": "H100 SXM (sm_90)", "sms": 132}}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
GROUP_SIZES = (128, 64, -1)  # the configs' 128, a finer group, one group per row
# routed rows per launch: decode at batch 1 and 8, and a 128-token prompt at batch 1 and 8
TOKENS_PER_CALL = (1, 8, 128, 1024)


@dataclass(frozen=True)
class ExpertShape:
    """A paper model's routed-expert geometry (hidden size H, expert intermediate size I, E experts, top-k)."""

    model: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int

    @property
    def projections(self) -> dict[str, tuple[int, int]]:
        """[N, K] of each packed matrix: gate and up are [I, H], down is [H, I]."""
        return {"gate_up": (self.intermediate, self.hidden), "down": (self.hidden, self.intermediate)}


@dataclass(frozen=True)
class Specialization:
    kernel: str          # a KERNEL_PATHS key
    arch: int            # 80 or 90
    dtype: str           # activations' dtype: fp16 / bf16
    bits: int
    group_size: int      # -1 = one group per row
    constexprs: tuple    # sorted (name, value) pairs
    signature: tuple     # sorted (name, type) pairs of the runtime arguments
    used_by: tuple = field(default=(), compare=False)  # "model:projection:tokens" that launch it

    @property
    def name(self) -> str:
        c = dict(self.constexprs)
        tile = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}" + (f"-split{c['SPLIT_K']}" if "SPLIT_K" in c else "")
        group = "row" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.kernel}/sm_{self.arch}/{self.dtype}/{self.bits}bit/{group}/{tile}"


@dataclass(frozen=True)
class KernelPath:
    """One launchable kernel: its jit function, its runtime signature and the constants its launcher picks."""

    kernel: Callable[[], object]                                 # -> the @triton.jit function (imported lazily)
    signature: Callable[[str, dict], dict]                       # (dtype, constexprs) -> {arg: type}
    constexprs: Callable[[ExpertShape, str, int, int, int, int], list[dict]]  # (shape, proj, bits, group, tokens, sms)


def _tm():
    from . import triton_matmul

    return triton_matmul


def _fake_weight(n: int, k: int, bits: int, group_size: int):
    return SimpleNamespace(shape=(n, k), bits=bits, group_size=group_size)


@contextlib.contextmanager
def _multiprocessors(sms: int):
    """default_config as on a GPU with `sms` multiprocessors (it reads the count from the device)."""
    with mock.patch.object(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(
            multi_processor_count=sms)):
        yield


def _single_constexprs(shape: ExpertShape, proj: str, bits: int, group: int, tokens: int, sms: int) -> list[dict]:
    """dequant_matmul_triton on one expert's matrix with all `tokens` rows (the benchmark's and a dense launch)."""
    tm = _tm()
    n, k = shape.projections[proj]
    weight = object.__new__(tm.PackedWeight)  # only its shape, width and group are read (isinstance: split-K)
    object.__setattr__(weight, "shape", (n, k))
    object.__setattr__(weight, "bits", bits)
    object.__setattr__(weight, "group_size", group)
    with _multiprocessors(sms):
        cfg = tm.default_config(tokens, weight, torch.device("cuda"))
    k_per_split = -(-(-(-k // cfg.split_k)) // cfg.block_k) * cfg.block_k
    split_k = -(-k // k_per_split)  # as the launcher recomputes it
    return [{**tm._plane_constexprs(bits), "GROUP": tm._group_constexpr(group), "BLOCK_M": cfg.block_m,
             "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "SPLIT_K": split_k}]


def _grouped_constexprs(shape: ExpertShape, proj: str, bits: int, group: int, tokens: int, sms: int) -> list[dict]:
    """grouped_dequant_matmul_triton over a whole layer's stack: rows per slot = routed rows / experts."""
    tm = _tm()
    n, k = shape.projections[proj]
    rows = max(1, tokens * shape.top_k // shape.experts)
    cfg = tm.default_config(rows, _fake_weight(n, k, bits, group), torch.device("cpu"))  # no split-K here
    return [{**tm._plane_constexprs(bits), "GROUP": tm._group_constexpr(group), "BLOCK_M": cfg.block_m,
             "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k}]


def _single_signature(dtype: str, constexprs: dict) -> dict:
    out = "fp32" if constexprs["SPLIT_K"] > 1 else dtype  # split-K accumulates into an fp32 workspace
    return {"x_ptr": f"*{dtype}", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*i32", "y_ptr": f"*{out}",
            **dict.fromkeys(["M", "N", "K", "k_per_split", "stride_xm", "stride_qn", "stride_sn", "stride_zg",
                             "stride_ym"], "i32")}


def _grouped_signature(dtype: str, constexprs: dict) -> dict:
    return {"x_ptr": f"*{dtype}", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*i32", "y_ptr": f"*{dtype}",
            "rows_ptr": "*i32", "block_slot_ptr": "*i32", "block_col_ptr": "*i32",
            **dict.fromkeys(["N", "K", "in_div", "stride_xm", "stride_qs", "stride_qn", "stride_ss", "stride_sn",
                             "stride_zs", "stride_zg", "stride_ym"], "i32")}


# One entry per launchable kernel. The slot-table path (adaptive DQS on packed layers) goes here too.
KERNEL_PATHS: dict[str, KernelPath] = {
    "dequant_matmul": KernelPath(lambda: _tm()._dequant_matmul_kernel, _single_signature, _single_constexprs),
    "grouped_dequant_matmul": KernelPath(lambda: _tm()._grouped_dequant_matmul_kernel, _grouped_signature,
                                         _grouped_constexprs),
}


def expert_shape(name: str, config: dict) -> ExpertShape:
    """A paper model's ExpertShape from its HF config.json (the families' field names)."""
    inter = config.get("moe_intermediate_size") or config["intermediate_size"]
    experts = config.get("num_experts") or config.get("num_local_experts") or config["n_routed_experts"]
    return ExpertShape(name, config["hidden_size"], inter, experts, config["num_experts_per_tok"])


def enumerate_specializations(shapes: list[ExpertShape], *, archs=tuple(TARGETS), bits=PACKED_BITS,
                              group_sizes=GROUP_SIZES, dtypes=tuple(DTYPES), tokens=TOKENS_PER_CALL,
                              kernels=tuple(KERNEL_PATHS)) -> list[Specialization]:
    """The distinct specializations (kernel, target, constants, signature) the shapes launch, with their users."""
    found: dict[tuple, tuple[Specialization, list[str]]] = {}
    for kernel in kernels:
        path = KERNEL_PATHS[kernel]
        for arch in archs:
            for shape in shapes:
                for proj in shape.projections:
                    for b in bits:
                        for g in group_sizes:
                            for t in tokens:
                                for consts in path.constexprs(shape, proj, b, g, t, TARGETS[arch]["sms"]):
                                    for dtype in dtypes:
                                        spec = Specialization(kernel, arch, dtype, b, g,
                                                              tuple(sorted({**consts, "DOT_PRECISION": "tf32"}
                                                                           .items())),
                                                              tuple(sorted(path.signature(dtype, consts).items())))
                                        key = (spec.kernel, spec.arch, spec.dtype, spec.constexprs, spec.signature)
                                        found.setdefault(key, (spec, []))[1].append(f"{shape.model}:{proj}:{t}")
    return [Specialization(**{**spec.__dict__, "used_by": tuple(users)}) for spec, users in found.values()]


def compile_specialization(spec: Specialization):
    """triton.compile for the spec's target (PTX and cubin, no GPU needed); errors name the specialization."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(spec.constexprs)
    signature = {**dict(spec.signature), **dict.fromkeys(constexprs, "constexpr")}
    try:
        return triton.compile(ASTSource(KERNEL_PATHS[spec.kernel].kernel(), signature, constexprs),
                              target=GPUTarget("cuda", spec.arch, 32))
    except Exception as err:  # noqa: BLE001 - re-raised with the specialization's name
        raise RuntimeError(f"{spec.name} failed to compile: {type(err).__name__}: {err}") from err


# --- resources of a compiled specialization ---------------------------------------------------------------

# Per-SM limits (CUDA C Programming Guide, "Features and Technical Specifications", compute capability 8.0
# and 9.0): 64K 32-bit registers, 2048 resident threads, 32 resident blocks; shared memory per SM 164 KB
# (8.0) and 228 KB (9.0), of which the driver reserves 1 KB per block. Registers are allocated per warp in
# units of 256.
SM_LIMITS = {80: {"regs": 65536, "threads": 2048, "blocks": 32, "smem": 164 * 1024},
             90: {"regs": 65536, "threads": 2048, "blocks": 32, "smem": 228 * 1024}}
RESERVED_SMEM_PER_BLOCK = 1024


def occupancy(arch: int, regs: int, shared: int, num_warps: int) -> dict:
    """Resident programs (blocks) per SM that registers, shared memory and threads allow, and the warps that is."""
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by = {"registers": lim["regs"] // (regs_per_warp * num_warps),
          "shared_memory": lim["smem"] // (shared + RESERVED_SMEM_PER_BLOCK),
          "threads": lim["threads"] // (32 * num_warps), "blocks": lim["blocks"]}
    blocks = min(by.values())
    return {"programs_per_sm": blocks, "limited_by": min(by, key=by.get), "warps_per_sm": blocks * num_warps,
            "occupancy": round(blocks * num_warps * 32 / lim["threads"], 4), "limits": by}


def _parse_ptxas(log: str) -> dict:
    import re

    out = {}
    for key, pattern in {"registers": r"Used (\d+) registers", "stack_frame_bytes": r"(\d+) bytes stack frame",
                         "spill_store_bytes": r"(\d+) bytes spill stores",
                         "spill_load_bytes": r"(\d+) bytes spill loads"}.items():
        found = re.findall(pattern, log)
        if found:
            out[key] = int(found[-1])
    return out


def _res_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL of the cubin by Triton's bundled `cuobjdump -res-usage`."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {"reg": int(fields["REG"]), "stack": int(fields["STACK"]), "static_shared": int(fields["SHARED"]),
            "local": int(fields["LOCAL"])}


def resources(spec: Specialization) -> dict:
    """Compile `spec` afresh and read its resources: ptxas's own report (-v, which Triton passes) and the cubin's."""
    import io
    from contextlib import redirect_stdout

    import triton

    log = io.StringIO()
    with mock.patch.object(triton.knobs.nvidia, "dump_ptxas_log", True), \
            mock.patch.object(triton.knobs.compilation, "always_compile", True), redirect_stdout(log):
        compiled = compile_specialization(spec)
    ptxas = _parse_ptxas(log.getvalue())
    res = _res_usage(compiled.asm["cubin"])
    meta = compiled.metadata
    regs = ptxas.get("registers", res["reg"])
    shared = max(meta.shared, res["static_shared"])
    driver = {}
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] * 10 == spec.arch:
        compiled._init_handles()  # loads the cubin: the driver's own counts, on a GPU of this architecture
        driver = {"driver_n_regs": compiled.n_regs, "driver_n_spills": compiled.n_spills}
    return {**driver, "registers_per_thread": regs, "spill_store_bytes": ptxas.get("spill_store_bytes"),
            "spill_load_bytes": ptxas.get("spill_load_bytes"), "stack_frame_bytes": res["stack"],
            "local_memory_bytes": res["local"], "shared_memory_bytes": shared, "num_warps": meta.num_warps,
            "num_stages": meta.num_stages, **occupancy(spec.arch, regs, shared, meta.num_warps)}
