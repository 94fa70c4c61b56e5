"""dynamo_kernels stands alone: it imports and computes with the harness (`dynamo`) unimportable.

The check runs in a fresh interpreter (`-I`: no PYTHONPATH, no working directory on sys.path) whose
only route to this repository is a temporary folder holding a copy of dynamo_kernels/; the editable
install (`pip install -e .`, which would map `dynamo` back in) is unhooked, as in
tests/export/test_guard.py. There it packs random codes of every width, unpacks them, and checks the
reference matmul and the dispatcher's CPU path against a float64 matmul written from the layout's
definition (w = scale * (q - zero)), then that neither the harness nor transformers got imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from conftest import REPO

ALONE = """
import importlib.util, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "").lower()]
sys.path_hooks = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
sys.path = [p for p in sys.path if "__editable__" not in p] + [sys.argv[1]]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("dynamo") is None, "the harness is still importable"

import torch
import dynamo_kernels
from dynamo_kernels import PackedWeight, dequant_matmul, dequant_matmul_ref, pack_codes, unpack_codes
from dynamo_kernels.packing import PACKED_BITS, packed_columns

assert dynamo_kernels.__file__.startswith(sys.argv[1]), dynamo_kernels.__file__
gen = torch.Generator().manual_seed(0)
n, k, group = 24, 70, 16  # K not a multiple of any plane's values per word; the last group is short
groups = -(-k // group)
for bits in PACKED_BITS:
    codes = torch.randint(0, 2 ** bits, (n, k), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 2 ** bits, (n, groups), generator=gen).float()
    scales = torch.rand(n, groups, generator=gen) + 0.5
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, k), codes), bits
    w = PackedWeight.pack(codes, scales, zeros, bits, group)
    assert w.qweight.shape == (n, packed_columns(k, bits)), bits
    assert torch.equal(w.unpack(), codes) and torch.equal(w.zero_points().float(), zeros), bits
    g = torch.arange(k) // group
    dense = w.scales.double()[:, g] * (codes.double() - zeros.double()[:, g])  # the fp16 scales w stores
    x = torch.randn(5, k, generator=gen)
    expected = x.double() @ dense.T
    for y in (dequant_matmul_ref(x, w), dequant_matmul(x, w)):  # CPU: dispatch picks the torch reference
        err = (y.double() - expected).abs().max() / expected.abs().max()
        assert err < 1e-5, (bits, float(err))
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("dynamo", "transformers"))
assert not leaked, leaked
print("STANDALONE OK", len(PACKED_BITS))
"""


def test_kernels_import_and_compute_without_the_harness(tmp_path):
    shutil.copytree(REPO / "dynamo_kernels", tmp_path / "dynamo_kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-I", "-c", ALONE, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STANDALONE OK 5" in proc.stdout
