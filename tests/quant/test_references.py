"""Our GPTQ and fuzzy c-means against implementations we did not write.

GPTQ is compared with a textbook version written here from the paper's equations (Frantar et al.
2022, eqs. 2-3: quantize one column, spread its error over the remaining columns through H^-1,
then remove that column from H^-1 by Gaussian elimination), in float64, with none of the
reference code's tricks (Cholesky factor, lazy blocks). Fuzzy c-means is compared with
scikit-fuzzy's cmeans started from our deterministic partition.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynamo.quant.fcm import _memberships, fuzzy_cmeans
from dynamo.quant.gptq import quantize_gptq
from dynamo.quant.rtn import fit_params
from dynamo.quant.spec import QSpec


def textbook_gptq(w: torch.Tensor, h: torch.Tensor, spec: QSpec, damp: float = 0.01):
    w, h = w.double().clone(), h.double().clone()
    rows, cols = w.shape
    h += damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    group = cols if spec.group_size == -1 else spec.group_size
    maxq = 2 ** spec.bits - 1
    dequantized, loss = torch.zeros_like(w), 0.0
    for q in range(cols):
        if q % group == 0:  # group parameters from the current (error-compensated) weights
            scale, zero = (t.double() for t in fit_params(w[:, q:q + group].float(), spec))
        code = torch.clamp(torch.round(w[:, q] / scale) + zero, 0, maxq)
        dequantized[:, q] = scale * (code - zero)
        err = (w[:, q] - dequantized[:, q]) / hinv[q, q]                         # eq. 2
        loss += float((w[:, q] - dequantized[:, q]).square().sum() / hinv[q, q] / 2)
        w[:, q:] -= err[:, None] * hinv[q, q:][None, :]
        hinv -= torch.outer(hinv[:, q], hinv[q, :]) / hinv[q, q]                # eq. 3
    return dequantized, loss


@pytest.mark.parametrize("bits,group_size,sym", [(3, -1, False), (4, 32, False), (2, 16, True)])
def test_gptq_matches_the_papers_equations(bits, group_size, sym):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 96, generator=g)
    x = torch.randn(512, 96, generator=g) * torch.linspace(0.2, 3.0, 96)  # unequal column scales
    h = x.T @ x
    spec = QSpec(bits=bits, group_size=group_size, sym=sym)
    ours, our_loss = quantize_gptq(w, h, spec, blocksize=32)  # blocks of 32: lazy updates cross them
    expected, expected_loss = textbook_gptq(w, h, spec)
    torch.testing.assert_close(ours.dequantize().double(), expected, atol=1e-4, rtol=0)
    assert our_loss == pytest.approx(expected_loss, rel=1e-4)


@pytest.mark.parametrize("clusters", [2, 4])
def test_fuzzy_cmeans_matches_scikit_fuzzy(clusters):
    skfuzzy = pytest.importorskip("skfuzzy")  # in the test extra
    rng = np.random.default_rng(clusters)
    x = np.concatenate([rng.normal(c, 0.05, 20) for c in (0.1, 0.3, 0.6, 0.9)])
    ours = fuzzy_cmeans(torch.from_numpy(x), clusters=clusters, eps=1e-12, max_iter=1000)
    # start scikit-fuzzy from the partition ours starts from (centres at evenly spaced quantiles)
    start_centres = torch.quantile(torch.from_numpy(x), (torch.arange(clusters, dtype=torch.double) + 0.5) / clusters)
    init = _memberships(torch.from_numpy(x), start_centres, 2.0).numpy().T
    centres, u, *_ = skfuzzy.cluster.cmeans(x[None, :], clusters, 2.0, error=1e-12, maxiter=1000, init=init)
    order = np.argsort(centres[:, 0])
    assert ours.converged
    np.testing.assert_allclose(ours.centres.numpy(), centres[order, 0], atol=1e-8)
    np.testing.assert_allclose(ours.memberships.numpy(), u[order].T, atol=1e-8)
