"""Low-rank candidates: EoRA's rank-r optimum of the output error tr(W D H D^T), and gains that are exact."""

from __future__ import annotations

import pytest
import torch

from dynamo.switching.adaptive import lowrank_components

GEN = torch.Generator().manual_seed(11)


def problem(n: int = 12, k: int = 20, tokens: int = 60):
    d = torch.randn(n, k, generator=GEN, dtype=torch.float64)
    x = torch.randn(tokens, k, generator=GEN, dtype=torch.float64) * torch.linspace(0.1, 3, k, dtype=torch.float64)
    return d, x.T @ x


def error(e: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> float:
    return float(torch.einsum("r,ri,ij,rj->", w, e, h, e))


def optimum(d: torch.Tensor, h: torch.Tensor, w: torch.Tensor, rank: int) -> float:
    """The float64 reference: the rank-r optimum's error is the tail of the squared singular values of
    W^1/2 D H^1/2 (H^1/2 from an eigendecomposition, independent of the Cholesky route under test)."""
    vals, vecs = torch.linalg.eigh(h)
    root = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    s = torch.linalg.svdvals(w.sqrt()[:, None] * d @ root)
    return float(s[rank:].square().sum())


@pytest.mark.parametrize("weighted", [False, True])
def test_low_rank_components_reach_the_float64_rank_r_optimum_without_damping(weighted):
    d, h = problem()
    w = torch.rand(d.shape[0], generator=GEN, dtype=torch.float64) + 0.2 if weighted else torch.ones(d.shape[0],
                                                                                                   dtype=torch.float64)
    a, bt, gains = lowrank_components(d, d @ h, h, torch.diagonal(h), w if weighted else None, max_rank=8, damp=0.0)
    assert a.shape == (8, d.shape[1]) and bt.shape == (8, d.shape[0])
    for rank in (1, 3, 8):
        residual = d - bt[:rank].T @ a[:rank]
        assert error(residual, h, w) == pytest.approx(optimum(d, h, w, rank), rel=1e-9)
        # the gains are the error the prefix removes, exactly
        assert float(gains[:rank].sum()) == pytest.approx(error(d, h, w) - error(residual, h, w), rel=1e-9)
    assert bool((gains[:-1] >= gains[1:] - 1e-9).all())  # squared singular values, decreasing


def test_damped_components_are_scored_by_what_they_remove_from_the_undamped_error():
    d, h = problem(tokens=8)  # fewer tokens than inputs: H is singular, the damping keeps the factor finite
    w = torch.ones(d.shape[0], dtype=torch.float64)
    a, bt, gains = lowrank_components(d, d @ h, h, torch.diagonal(h), None, max_rank=6, damp=0.01)
    assert bool(torch.isfinite(a).all())
    for rank in (1, 2, 6):
        residual = d - bt[:rank].T @ a[:rank]
        assert float(gains[:rank].sum()) == pytest.approx(error(d, h, w) - error(residual, h, w), rel=1e-9)
        assert error(residual, h, w) >= optimum(d, h, w, rank) - 1e-9 * error(d, h, w)


def test_the_diagonal_scorings_use_the_diagonal_only():
    d, h = problem()
    diag = torch.diagonal(h).clone()
    w = torch.ones(d.shape[0], dtype=torch.float64)
    a, bt, gains = lowrank_components(d, d * diag[None, :], None, diag, None, max_rank=4, damp=0.0)
    residual = d - bt.T @ a
    assert error(residual, torch.diag(diag), w) == pytest.approx(optimum(d, torch.diag(diag), w, 4), rel=1e-9)
    assert float(gains.sum()) == pytest.approx(error(d, torch.diag(diag), w) - error(residual, torch.diag(diag), w),
                                               rel=1e-9)


@pytest.mark.parametrize("candidates", ["all", "experts8"])
def test_a_packed_export_refuses_whole_8_bit_experts_before_any_model_work(candidates):
    from dynamo.errors import UserError
    from dynamo.pipeline import check_switching
    from dynamo.config import register_hydra
    from dynamo.preflight import compose_checked

    register_hydra()
    cfg, = compose_checked(["quant=dynamo_3bit", "quant.export=packed", f"quant.switching.candidates={candidates}"],
                           multirun=False)
    with pytest.raises(UserError, match="rows_cols_lowrank"):
        check_switching(cfg)
    ok, = compose_checked(["quant=dynamo_3bit", "quant.export=packed", "quant.switching.candidates=rows_cols_lowrank"],
                          multirun=False)
    check_switching(ok)
