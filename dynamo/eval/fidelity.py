"""Fidelity to the 16-bit model: per-window mean KL(FP16 || quantized) and top-1 agreement.

Token PPL is a poor judge of a quantized model on a novel domain (it is not even monotone in
fidelity there); KL to the 16-bit model's next-token distribution is what llama.cpp reports
(`--kl-divergence`) for the same reason. The reference pass (the FP16 model, before quantizing)
writes its next-token log-probabilities per window to disk, one np.memmap per dataset; every
later pass over the same windows reads them back window by window and compares. Nothing of the
reference is held in RAM beyond one batch, so a big vocabulary costs disk, not memory.

What is stored per predicted token, by `topk`:
- None (default): the full probability vector p in float16 (vocab * 2 bytes; 8 MiB per
  512-token window at the embedded models' 8k vocabulary), with sum p log p and sum p over those
  stored p (float32) and the argmax. A later pass reuses the log-probs its loss is computed from
  (dynamo.eval.perplexity), so KL = sum p log p - sum p log q is one product-sum per token.
  Exact up to the float16 rounding of p, which is common to every pass compared against the
  same reference (an identical model scores 0).
- k: the k largest log-probabilities (float16) and their token ids (int32), sorted. KL is then
  the KL of the distributions coarsened to {top-k tokens, the rest}: sum over the top k of
  p (log p - log q) + p_rest (log p_rest - log q_rest), a lower bound of the full KL (data
  processing inequality), exact when the top k hold all of p's mass. For vocabularies where the
  full vectors do not fit on disk (50k+ tokens at seqlen 2048).
Top-1 agreement: the quantized model's argmax equals the reference's argmax.

`eval.kl_topk` unset means: the full vector up to FULL_VOCAB_MAX tokens, the top DEFAULT_TOPK above
(a 152k vocabulary would otherwise put ~148 MB per 512-token window on disk). Before the reference
pass, `check_reference_disk` compares the bytes the reference will take (`reference_nbytes`) with the
free space of its folder and refuses, naming eval.kl_topk, when they do not fit.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError


FULL_VOCAB_MAX = 32768  # vocabularies up to this keep the full vector by default (the embedded models: 8192)
DEFAULT_TOPK = 256      # above it, the top 256 log-probs + the rest's mass (eval=paper's setting)
DISK_MARGIN = 1.1       # the reference may take at most 1/1.1 of the free space


def default_topk(topk: int | None, vocab: int) -> int | None:
    """eval.kl_topk as applied: an explicit k stays; unset keeps the full vector only for small vocabularies."""
    if topk is not None:
        return topk
    return DEFAULT_TOPK if vocab > FULL_VOCAB_MAX else None


def reference_nbytes(windows: dict[str, tuple[int, int]], vocab: int, topk: int | None) -> int:
    """Disk bytes of the reference for {name: (windows, seqlen)}: per predicted token, the full p (fp16) +
    sum p log p, sum p (fp32) and the argmax (int32), or k values (fp16) + k ids (int32)."""
    per_token = vocab * 2 + 12 if topk is None else min(topk, vocab) * 6
    return sum(n * (seqlen - 1) * per_token for n, seqlen in windows.values())


def check_reference_disk(needed: int, folder: str | Path | None, topk: int | None, vocab: int) -> None:
    """Refuse (one line) a reference pass whose log-probs would not fit on the disk of `folder`."""
    folder = Path(folder or tempfile.gettempdir())
    free = shutil.disk_usage(folder).free
    if needed * DISK_MARGIN > free:
        kept = "the full vocabulary" if topk is None else f"the top {min(topk, vocab)}"
        smaller = max(1, int(free / DISK_MARGIN / max(needed, 1) * min(topk or vocab, vocab)))
        raise UserError(f"the FP16 reference for KL needs {needed / 1e9:.2f} GB ({needed} bytes: {kept} of {vocab} "
                        f"log-probs per token) but {folder} has {free / 1e9:.2f} GB free; set eval.kl_topk to at "
                        f"most {smaller}, fewer eval.max_windows, or free space there (TMPDIR)")


@dataclass
class WindowFidelity:
    """Per-window means over predicted tokens, in window order."""

    kl: list[float] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)

    @property
    def mean_kl(self) -> float:
        return float(np.mean(self.kl))

    @property
    def mean_top1(self) -> float:
        return float(np.mean(self.top1))


def _kl_topk(values: torch.Tensor, index: torch.Tensor, logq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k reference (values [b, T, k] sorted, ids [b, T, k]) against full logq [b, T, V]."""
    q = logq.gather(-1, index)
    p_in, q_in = values.exp(), q.exp()
    tiny = torch.finfo(logq.dtype).tiny
    p_rest = (1.0 - p_in.sum(-1)).clamp_min(0.0)
    q_rest = (1.0 - q_in.sum(-1)).clamp_min(tiny)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(tiny).log() - q_rest.log()), torch.zeros_like(p_rest))
    kl = (p_in * (values - q)).sum(-1) + rest
    return kl.clamp_min(0.0), (index[..., 0] == logq.argmax(-1)).float()


class ReferenceLogprobs:
    """The reference pass's next-token log-probs of every dataset's windows, on disk.

    `recorder(name, windows)` returns the per-batch callback of the reference pass;
    `comparer(name)` the callback of a later pass and the WindowFidelity it fills. Use as a context
    manager (or call `close`): the directory is deleted at the end of the run."""

    def __init__(self, topk: int | None = None, root: str | Path | None = None):
        if topk is not None and topk < 1:
            raise UserError(f"eval.kl_topk must be >= 1 (or null for the full vocabulary), got {topk}")
        self.topk = topk
        self.dir = Path(tempfile.mkdtemp(prefix="dynamo-kl-ref-", dir=root))
        self.shapes: dict[str, tuple[int, int, int]] = {}   # name -> (windows, predicted tokens, stored width)
        self.done: dict[str, int] = {}                      # name -> windows written

    def __enter__(self) -> "ReferenceLogprobs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.dir.glob("*.npy"))

    def _open(self, name: str, suffix: str, dtype, shape: tuple) -> np.memmap:
        return np.lib.format.open_memmap(self._path(name, suffix), mode="w+", dtype=dtype, shape=shape)

    def _path(self, name: str, suffix: str) -> Path:
        return self.dir / f"{list(self.shapes).index(name)}_{suffix}.npy"  # dataset names need not be file-safe

    def recorder(self, name: str, windows: torch.Tensor, vocab: int):
        """Callback (first window index, next-token log-probs [b, T - 1, V]) storing the reference of `windows`."""
        n, seqlen = windows.shape
        width = vocab if self.topk is None else min(self.topk, vocab)
        self.shapes[name] = (n, seqlen - 1, width)
        self.done[name] = 0
        values = self._open(name, "values", np.float16, self.shapes[name])
        if self.topk is None:  # per token: sum p log p and sum p over the stored p, and the argmax
            extra = (self._open(name, "token", np.float32, (n, seqlen - 1, 2)),
                     self._open(name, "top1", np.int32, (n, seqlen - 1)))
        else:
            extra = (self._open(name, "index", np.int32, self.shapes[name]),)

        def record(start: int, logprobs: torch.Tensor) -> None:
            for w in range(len(logprobs)):  # one window at a time: [T, V] temporaries, not [b, T, V]
                logp = logprobs[w]
                if self.topk is None:
                    p = logp.exp().to(torch.float16)
                    pf = p.float()
                    values[start + w] = p.cpu().numpy()
                    extra[0][start + w] = torch.stack([(pf * logp).sum(-1), pf.sum(-1)], -1).cpu().numpy()
                    extra[1][start + w] = logp.argmax(-1).to(torch.int32).cpu().numpy()
                else:
                    top = logp.topk(width, dim=-1, sorted=True)
                    values[start + w] = top.values.to(torch.float16).cpu().numpy()
                    extra[0][start + w] = top.indices.to(torch.int32).cpu().numpy()
            self.done[name] = max(self.done[name], start + len(logprobs))
            if self.done[name] == n:
                for m in (values, *extra):
                    m.flush()

        return record

    def comparer(self, name: str, windows: torch.Tensor):
        """(callback, WindowFidelity): compares a pass over the same `windows` with the reference."""
        if name not in self.shapes or self.done.get(name) != self.shapes[name][0]:
            raise RuntimeError(f"no complete reference log-probs for '{name}'")
        n, t, width = self.shapes[name]
        if tuple(windows.shape) != (n, t + 1):
            raise RuntimeError(f"'{name}': the reference covers {n} windows of {t + 1} tokens, "
                               f"this pass {tuple(windows.shape)}")
        load = lambda suffix: np.load(self._path(name, suffix), mmap_mode="r")  # noqa: E731
        values = load("values")
        extra = (load("token"), load("top1")) if self.topk is None else (load("index"),)
        out = WindowFidelity()

        def compare(start: int, logprobs: torch.Tensor) -> None:
            for w in range(len(logprobs)):  # one window at a time: [T, V] temporaries, not [b, T, V]
                logq = logprobs[w]
                ref = torch.from_numpy(np.array(values[start + w])).to(logq.device).float()
                if self.topk is None:
                    # KL = sum p log p (stored) - sum p log q: one product-sum per token
                    token = torch.from_numpy(np.array(extra[0][start + w])).to(logq.device)
                    kl = (token[:, 0] - (ref * logq).sum(-1)).clamp_min(0.0)
                    top1 = torch.from_numpy(np.array(extra[1][start + w])).to(logq.device)
                    agree = (logq.argmax(-1) == top1).float()
                else:
                    ids = torch.from_numpy(np.array(extra[0][start + w])).to(logq.device).long()
                    kl, agree = _kl_topk(ref, ids, logq)
                out.kl.append(float(kl.double().mean()))
                out.top1.append(float(agree.double().mean()))

        return compare, out

