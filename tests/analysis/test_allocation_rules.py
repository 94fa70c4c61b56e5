"""DynaMo's allocation rules: fusion (Eq. 2), fuzzy c-means (Algorithm 1), the exact budget solver."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dynamo.errors import UserError
from dynamo.quant.budget import layer_budget, solve_budget
from dynamo.quant.fcm import _memberships, fcm_widths, fuzzy_cmeans
from dynamo.quant.fusion import fuse


def test_memberships_match_the_hand_computed_formula():
    # x = 0.25 between centres 0 and 1, m = 2: u = 1 / (1 + (0.25 / 0.75)^2) = 0.9 and 0.1
    u = _memberships(torch.tensor([0.25, 1.0], dtype=torch.double), torch.tensor([0.0, 1.0], dtype=torch.double), 2.0)
    torch.testing.assert_close(u[0], torch.tensor([0.9, 0.1], dtype=torch.double))
    torch.testing.assert_close(u[1], torch.tensor([0.0, 1.0], dtype=torch.double))  # on a centre: all of it


def test_fcm_memberships_sum_to_one_and_centres_are_ordered():
    x = torch.tensor([0.30, 0.01, 0.02, 0.20, 0.11, 0.09, 0.03, 0.24])
    result = fuzzy_cmeans(x, clusters=4)
    assert result.converged
    torch.testing.assert_close(result.memberships.sum(dim=1), torch.ones(8, dtype=torch.double))
    assert torch.all(result.centres[1:] > result.centres[:-1])
    assert torch.equal(fuzzy_cmeans(x, clusters=4).memberships, result.memberships)  # deterministic


def test_symmetric_data_gives_symmetric_centres():
    result = fuzzy_cmeans(torch.tensor([0.0, 0.1, 1.0, 1.1]), clusters=2)
    torch.testing.assert_close(result.centres.sum(), torch.tensor(1.1, dtype=torch.double))
    assert 0.0 < result.centres[0] < 0.1 and 1.0 < result.centres[1] < 1.1


def test_cluster_rank_maps_to_width_and_overlaps_go_to_the_lower_precision():
    groups = [0.0] * 3 + [1.0] * 3 + [2.0] * 3 + [3.0] * 3
    x = torch.tensor(groups + [1.5, 2.95])
    bits, result = fcm_widths(x, [8, 6, 4, 2], overlap_margin=0.1)
    assert bits[:12] == [2] * 3 + [4] * 3 + [6] * 3 + [8] * 3
    top = torch.topk(result.memberships[12], 2).values
    assert float(top[0] - top[1]) < 0.1 and bits[12] == 4   # between the INT4 and INT6 clusters -> INT4
    assert bits[13] == 8
    # without the overlap rule the midpoint expert would take whichever cluster is marginally closer
    assert fcm_widths(x, [8, 6, 4, 2], overlap_margin=0.0)[0][12] in (4, 6)
    with pytest.raises(ValueError, match="high to low"):
        fcm_widths(x, [2, 4, 6, 8])


@pytest.mark.parametrize("seed", range(6))
def test_budget_solver_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    widths = [8, 6, 4, 3, 2]
    n = 5
    costs = rng.random((n, 1)) * (2.0 ** -np.array(widths, dtype=float))[None, :] * rng.uniform(0.5, 2, (n, 5))
    budget = int(rng.integers(2 * n, 8 * n + 1))
    got = solve_budget(costs, widths, budget)
    assert sum(got) <= budget
    got_cost = sum(costs[i, widths.index(b)] for i, b in enumerate(got))
    best = min(sum(costs[i, j] for i, j in enumerate(choice))
               for choice in itertools.product(range(len(widths)), repeat=n)
               if sum(widths[j] for j in choice) <= budget)
    assert got_cost == pytest.approx(best, rel=1e-12)


def test_budget_infeasible_and_layer_budget():
    with pytest.raises(UserError, match="cannot give"):
        solve_budget(np.ones((4, 2)), [4, 2], 7)
    assert layer_budget(16, 3.0) == 48 and layer_budget(64, 3.26) == 208


@pytest.mark.parametrize("how", ["mean", "max", "geomean", "gaussian"])
def test_fusion_sums_to_one_and_keeps_the_spread(how):
    shares = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4]])
    fused, spread = fuse(shares, how)
    assert float(fused.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(spread, shares.double().std(dim=0, unbiased=False))
    if how in ("mean", "gaussian"):
        torch.testing.assert_close(fused, shares.double().mean(dim=0))
    if how == "geomean":  # an expert silent on one dataset is not significant across them
        assert fused[3] < 1e-5
    if how == "max":
        assert fused[0] > fused[2] > fused[1]
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse(shares, "median")
