"""AdaptiveSwitcher: the dataset-adaptive DQS (ours; `quant.switching.policy=adaptive`, the default).

Why: the paper's switch rewrites channels fixed offline as "the rows that vary most across the
known datasets"; on a novel dataset those are no better than random rows (measured: 0.0% of
BQ's KL damage removed). Here the channels are chosen per dataset, from its own calib split.

Kept: the master copy of every routed expert (`master.py`: host memory in the model's dtype, or
read by slice from the checkpoint on disk). On the device: BQ, plus slots worth at most
`budget_frac` of the routed experts' FP16 bytes. A slot is an additive *correction* of BQ
(dynamo_kernels/slots.py): a row r gets W_bq[r] + delta, an input column j gets W[:, j] + delta
(measured after the rows were applied), deltas held as RTN-8 codes with an fp16 scale and zero per
group (`slot_bits=8`, about one byte a value) or fp16 values (16) + an int32 index each; a low-rank
component (`candidates=lowrank|rows_cols_lowrank|all`) adds b (a . x) to the output, the pair (a [K],
b [N]) held like a K-slot and an N-slot (EoRA's construction: the rank-r optimum of the same output
error the rows are scored with); an expert raised to 8 bits (`candidates=experts8|all`, fake-quantized
models only) costs the extra bytes of its 8-bit codes over its BQ codes. Every kind competes for one
byte budget by reduction per byte.

`switch_to(windows)`, one MoE layer at a time (memory flat in depth):
1. profile the layer on the windows (`capture_sequential`: the model as it is, quantized), with
   per-expert router-weighted Hessians H = sum r x x^T of the routed inputs of gate/up and of down;
2. score every candidate of the layer by the output-error reduction of restoring it, with
   D = W_master - W_bq: row r: d_r H d_r^T; column j: sum_r (2 d_rj (d_r H)_j - d_rj^2 H_jj);
   a whole expert at 8 bits: its error at BQ minus its error at RTN-8; low-rank component k of a matrix:
   its exact marginal reduction (`lowrank_components`). `scoring=output`/`local`
   keep H's diagonal only (far cheaper); with `output` (and `hessian`) errors of gate/up rows are
   carried to the expert's output (first order: ||W_down[:, r]||^2 E[h_r^2] / E[y_r^2]);
3. merge the layer's candidates into the running best set (per kind, sorted by reduction per byte and cut
   where the cumulative bytes pass KEEP x the budget: exactly each kind's global prefix), then free the layer's
   statistics: nothing of size [I, I] outlives its layer. After the last layer, ONE global byte budget
   is filled greedily from that set (a piece that no longer fits is skipped, smaller ones go on);
   rows and columns of an expert raised to 8 bits whole are dropped and the budget refilled;
4. compute the chosen slots' deltas from the master (one matrix at a time; low-rank factors were kept from
   the profile for the running set's components only) into a `SlotSet`, and
   write it: on a fake-quantized model into the dense weights (BQ slices backed up per matrix,
   batched), on a packed model into each layer's slot table (the codes are never touched). Every
   value is computed before any write; a failed write puts every touched slice back.

`switch_to_set(slot_set)` writes a saved set (slotset.py) the same way, without profiling.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dynamo_kernels.slots import LowRankGroup, SlotTable, dequantize_deltas, quantize_deltas, slot_nbytes

from ..adapters import PROJECTIONS, moe_layers
from ..calibration import capture_sequential
from ..errors import UserError
from ..quant.rtn import quantize_rtn
from ..quant.spec import QSpec
from .base import Switcher, SwitchSummary
from .master import VALUE_BYTES, ExpertMaster
from .slotset import SlotSet
from .store import Key
from .switch import check_token_windows
from .targets import PackedTarget, target_for

__all__ = ["AdaptiveReport", "AdaptiveSwitcher", "Candidates", "ExpertMaster", "CANDIDATES", "SCORINGS"]

ROW, COLUMN, EXPERT, LOWRANK = 0, 1, 2, 3
KIND_NAMES = ("row", "column", "expert8", "lowrank")
CANDIDATES = {"rows": (ROW,), "rows_cols": (ROW, COLUMN), "experts8": (EXPERT,), "lowrank": (LOWRANK,),
              "rows_cols_lowrank": (ROW, COLUMN, LOWRANK), "all": (ROW, COLUMN, EXPERT, LOWRANK)}
SCORINGS = ("hessian", "output", "local")
KEEP = 2  # the running set holds each kind's global best prefix of KEEP x the budget: room for the greedy's skips
# Low-rank components scored per matrix: at most this many (a truncated SVD past it; at Mixtral's width 1% of an
# expert's bytes buys rank ~30 per matrix, so 128 leaves the running set room), and the damping of H before its
# Cholesky factor (GPTQ's 1% of the mean diagonal: directions the profile barely saw are not amplified).
LOWRANK_MAX_RANK = 128
LOWRANK_DAMP = 0.01


@dataclass
class Candidates:
    """Restorable pieces as parallel tensors: reduction, bytes, and where each one is."""

    gain: torch.Tensor      # float32 expected output-error reduction
    cost: torch.Tensor      # int64 device bytes
    layer: torch.Tensor     # int32
    expert: torch.Tensor    # int32
    proj: torch.Tensor      # int8 index into PROJECTIONS (-1: every projection of an 8-bit expert)
    kind: torch.Tensor      # int8 ROW / COLUMN / EXPERT / LOWRANK
    index: torch.Tensor     # int32 row, column or low-rank component (-1 for a whole expert)

    FIELDS = ("gain", "cost", "layer", "expert", "proj", "kind", "index")

    @classmethod
    def empty(cls, device) -> Candidates:
        dtypes = (torch.float32, torch.int64, torch.int32, torch.int32, torch.int8, torch.int8, torch.int32)
        return cls(*(torch.empty(0, dtype=d, device=device) for d in dtypes))

    @classmethod
    def of(cls, gain: torch.Tensor, cost: int, layer: int, expert: int | torch.Tensor, proj: int, kind: int,
           index: torch.Tensor) -> Candidates:
        """Pieces of one layer, projection and kind; `expert` one id for all, or one per piece."""
        n, device = gain.numel(), gain.device

        def full(value, dtype):
            if isinstance(value, torch.Tensor):
                return value.to(device, dtype)
            return torch.full((n,), value, dtype=dtype, device=device)

        return cls(gain.float(), full(cost, torch.int64), full(layer, torch.int32), full(expert, torch.int32),
                   full(proj, torch.int8), full(kind, torch.int8), index.to(torch.int32))

    @classmethod
    def cat(cls, parts: list[Candidates]) -> Candidates:
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in cls.FIELDS))

    def take(self, which: torch.Tensor) -> Candidates:
        return Candidates(*(getattr(self, f)[which] for f in self.FIELDS))

    def to(self, device) -> Candidates:
        return Candidates(*(getattr(self, f).to(device) for f in self.FIELDS))

    def __len__(self) -> int:
        return int(self.gain.numel())

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in self.FIELDS)

    def ranked(self) -> Candidates:
        return self.take(torch.argsort(self.gain / self.cost.float(), descending=True, stable=True))

    def best_within(self, budget: int) -> Candidates:
        """The prefix, by reduction per byte, whose bytes fit `budget` (a sort and a cumulative sum)."""
        ranked = self.ranked()
        return ranked.take(torch.cumsum(ranked.cost, 0) <= budget)

    def best_of_each_kind(self, budget: int) -> Candidates:
        """Per kind (row, column, 8-bit expert, low-rank component), the best prefix that fits `budget`: a kind
        of big pieces cannot crowd the small ones out of the running set."""
        parts = [self.take(self.kind == k).best_within(budget) for k in range(len(KIND_NAMES))]
        return Candidates.cat(parts)

    def greedy_within(self, budget: int, max_rounds: int = 64) -> Candidates:
        """Greedy by reduction per byte, skipping a piece that no longer fits and going on with smaller ones
        (pieces differ in cost: a row, a column, a whole 8-bit expert). As tensor work: each round takes the
        longest prefix of the still-eligible pieces that fits; the piece that broke it can never fit again."""
        ranked = self.ranked()
        taken = torch.zeros(len(ranked), dtype=torch.bool, device=ranked.cost.device)
        alive = torch.ones_like(taken)
        left = int(budget)
        for _ in range(max_rounds):
            eligible = torch.nonzero(alive & (ranked.cost <= left)).squeeze(1)
            if not eligible.numel():
                break
            fits = torch.cumsum(ranked.cost[eligible], 0) <= left
            chosen = eligible[fits]
            taken[chosen] = True
            left -= int(ranked.cost[chosen].sum())
            stop = int(eligible[~fits][0]) + 1 if bool((~fits).any()) else len(ranked)
            alive[:stop] = False
        return ranked.take(taken)


@dataclass
class AdaptiveReport:
    slots: dict[str, int]             # rows / columns / low-rank components / experts8 written
    extra_nbytes: int                 # device-resident slot bytes
    budget_nbytes: int
    expected_reduction: float         # share of the scored BQ error the chosen set removes (profile's estimate)
    profile_s: float
    select_s: float
    write_s: float
    experts_changed: int              # experts holding at least one slot
    exact_bits: float                 # per routed weight: BQ codes (8 for raised experts) plus slot codes
    weights_rewritten: int = 0
    held_nbytes_peak: int = 0         # the most switch-held bytes at once (one layer's statistics + candidates)
    held_nbytes_by_layer: list = field(default_factory=list)
    source: str = "windows"           # windows (profiled and selected) or a saved set's name
    top: list = field(default_factory=list)  # the highest-scored slots, for the log

    @property
    def total_s(self) -> float:
        return self.profile_s + self.select_s + self.write_s

    def to_dict(self) -> dict:
        return {**asdict(self), "total_s": self.total_s}


def _reductions(d: torch.Tensor, g: torch.Tensor, diag: torch.Tensor, gain: torch.Tensor | None):
    """(per-row, per-column reductions, total error) of restoring rows/columns of error matrix d [out, in],
    with g = d H (H: the input Hessian, or its diagonal for the diagonal scorings).

    Output error of d over the profiled tokens: sum_r d_r^T H d_r. Restoring row r removes
    d_r^T H d_r; restoring column j removes sum_r (2 d_rj (d_r H)_j - d_rj^2 H_jj). Without H
    (diagonal scorings) both are sums of d^2 a with a = H's diagonal."""
    dg = d * g
    w = gain[:, None] if gain is not None else 1.0
    rows = (dg * w).sum(1)
    cols = ((2 * dg - d.square() * diag[None, :]) * w).sum(0)
    return rows, cols, float(rows.sum())


def lowrank_components(d: torch.Tensor, g: torch.Tensor, hessian: torch.Tensor | None, diag: torch.Tensor,
                       gain: torch.Tensor | None, max_rank: int, damp: float = LOWRANK_DAMP):
    """The best rank-r corrections of error d [N, K] for the output error tr(W d H d^T) (W = diag(gain), or 1),
    EoRA's construction with a Cholesky factor instead of an eigendecomposition: with H + damp I = L L^T, the
    SVD  W^1/2 d L = P S Q^T  gives components b_k = W^-1/2 p_k s_k^1/2, a_k = s_k^1/2 q_k^T L^-1, and
    sum_{k<r} b_k a_k is the rank-r optimum of the damped objective (exactly the optimum for damp = 0).

    Returns (A [q, K], B^T [q, N], marginal gains [q]) with q <= max_rank. The gains are exact for the
    undamped H and for prefixes (what the greedy takes, components of one matrix costing the same): gain_k =
    2 c_k - 2 sum_{j<k} U_jk V_jk - U_kk V_kk with c = diag(B^T W g A^T), U = B^T W B, V = A H A^T; with
    damp = 0 they are the squared singular values."""
    n, k = d.shape
    w = gain if gain is not None else torch.ones(n, dtype=d.dtype, device=d.device)
    diag_h = torch.diagonal(hessian) if hessian is not None else diag
    lam = damp * float(diag_h.mean()) if diag_h.numel() else 0.0
    if hessian is not None:
        damped = hessian + lam * torch.eye(k, dtype=d.dtype, device=d.device)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info):  # not positive definite in this precision: damp further (a rank-deficient profile)
            chol = torch.linalg.cholesky(damped + (lam + 1e-6 * float(diag_h.abs().max()) + 1e-12) *
                                         torch.eye(k, dtype=d.dtype, device=d.device))
        m = (w.sqrt()[:, None] * d) @ chol
    else:
        root = (diag + lam).clamp_min(1e-30).sqrt()
        m = w.sqrt()[:, None] * d * root[None, :]
    q = min(max_rank, n, k)
    if q <= 0:
        empty = d.new_zeros(0, k)
        return empty, d.new_zeros(0, n), d.new_zeros(0)
    if min(n, k) <= 4 * q or min(n, k) <= 1024:
        p_, s, vh = torch.linalg.svd(m, full_matrices=False)
        p_, s, v = p_[:, :q], s[:q], vh[:q].T
    else:  # real widths: a randomized truncated SVD (the top q only)
        p_, s, v = torch.svd_lowrank(m, q=q, niter=4)
    root_s = s.clamp_min(0).sqrt()
    inv_w = torch.where(w > 0, w.clamp_min(1e-30).rsqrt(), torch.zeros_like(w))
    b = inv_w[:, None] * p_ * root_s[None, :]                                   # [N, q]
    if hessian is not None:
        a = torch.linalg.solve_triangular(chol.T, v * root_s[None, :], upper=True).T   # [q, K]
        ah = a @ hessian
    else:
        a = (v * root_s[None, :]).T / root[None, :]
        ah = a * diag[None, :]
    c = ((w[:, None] * b) * (g @ a.T)).sum(0)
    u = b.T @ (w[:, None] * b)
    uv = u * (ah @ a.T)
    gains = 2 * c - 2 * torch.triu(uv, diagonal=1).sum(0) - torch.diagonal(uv)
    # the same product with factors of equal norm: both halves keep their precision in fp16 and on an 8-bit grid
    scale = (b.norm(dim=0) / a.norm(dim=1).clamp_min(1e-30)).clamp_min(1e-30).sqrt()
    return a * scale[:, None], (b / scale[None, :]).T, gains


def _flat(parts: list[tuple]) -> tuple[torch.Tensor, ...]:
    """Per-expert parts (expert, indices [n], values [n, L], ...) as flat tensors: an expert id per index, the
    indices, then each kind of values (float32) concatenated. One layer's matrices share a device: no round trip
    through the host."""
    device = parts[0][1].device
    expert = torch.cat([torch.full((part[1].numel(),), part[0], dtype=torch.int64, device=device) for part in parts])
    values = [torch.cat([part[j].float() for part in parts]) for j in range(2, len(parts[0]))]
    return (expert, torch.cat([part[1] for part in parts]), *values)


class AdaptiveSwitcher(Switcher):
    """Holds a BQ-quantized model (fake-quantized, or packed with slot tables); a switch restores the
    slots its new data needs most."""

    def __init__(self, model, plan, master, *, budget_frac: float = 0.01, candidates: str = "lowrank",
                 scoring: str = "hessian", slot_bits: int = 8, batch_size: int = 8):
        if candidates not in CANDIDATES:
            raise UserError(f"unknown quant.switching.candidates '{candidates}'; choose one of {', '.join(CANDIDATES)}")
        if scoring not in SCORINGS:
            raise UserError(f"unknown quant.switching.scoring '{scoring}'; choose one of {', '.join(SCORINGS)}")
        if not 0.0 < budget_frac < 1.0:
            raise UserError(f"quant.switching.budget_frac must be in (0, 1), got {budget_frac}")
        if slot_bits not in (16, 8):
            raise UserError(f"quant.switching.slot_bits must be 16 or 8, got {slot_bits}")
        if master is not None:
            master.validate(model)
        self.model, self.master = model, master
        self.target = target_for(model, plan)
        if EXPERT in CANDIDATES[candidates] and isinstance(self.target, PackedTarget):
            raise UserError(f"quant.switching.candidates={candidates}: a packed model serves row, column and low-rank "
                            "slots only (whole 8-bit experts would need a second packed copy); use rows_cols_lowrank")
        self.candidates, self.scoring, self.batch_size = candidates, scoring, batch_size
        self.score_dtype = torch.float32  # float64 picks the same set (tests/switching/test_adaptive.py)
        self.budget_frac, self.slot_bits = float(budget_frac), int(slot_bits)
        self.group_size = self.target.group_size
        self.layers = {layer.index: layer for layer in moe_layers(model)}
        self.shapes: dict[Key, tuple[int, int]] = {(i, e, p): layer.shape(p) for i, layer in self.layers.items()
                                                   for e in range(layer.n_experts) for p in PROJECTIONS}
        self.routed_weights = sum(a * b for a, b in self.shapes.values())
        self.fp16_nbytes = self.routed_weights * VALUE_BYTES
        self.budget_nbytes = int(budget_frac * self.fp16_nbytes)
        self.vocab = model.get_input_embeddings().num_embeddings
        self.active: SlotSet | None = None
        self.history: dict[str, SlotSet] = {}   # the sets `remember` kept, by dataset name (host memory)
        self.folder: Path | None = None         # saved slot sets to switch to by name (for_saved_sets)
        self._fingerprint: str | None = None    # the packed model's, for saved sets (its codes never change)
        # the low-rank factors of the running set's components, per matrix (host, fp16): a switch's profile
        # is gone when the set is built, so the factors computed with it are kept (at most KEEP x the budget)
        self._factors: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}

    # --- state ------------------------------------------------------------------------------

    @property
    def kinds(self) -> tuple[int, ...]:
        """The candidate kinds a switch scores (ROW, COLUMN, EXPERT, LOWRANK)."""
        return CANDIDATES[self.candidates]

    @property
    def slots(self) -> SlotSet | None:
        return self.active

    def weight(self, key: Key) -> torch.Tensor:
        """The matrix the model computes with now (fake-quantized: its dense weight; packed: BQ + slots)."""
        return self.target.effective(key, self.active)

    def bq_weight(self, key: Key) -> torch.Tensor:
        """The BQ values of one matrix (float32, on the weights' device)."""
        return self.target.bq(key)

    def restore_bq(self) -> AdaptiveReport:
        """Back to BQ: every active slot is removed."""
        t = time.perf_counter()
        self.target.apply(None)
        self.active = None
        return self._report(0.0, 0.0, 0.0, time.perf_counter() - t, 0)

    # --- the switch -------------------------------------------------------------------------

    @classmethod
    def for_saved_sets(cls, model, folder, master=None, batch_size: int = 8) -> AdaptiveSwitcher:
        """A switcher for a reloaded packed model with the settings its saved sets were made with
        (`folder`: the export's slot_sets/). `master` is needed only to switch to new windows."""
        from .slotset import saved_entry

        entry = saved_entry(Path(folder))
        switcher = cls(model, None, master, budget_frac=entry["budget_frac"], candidates=entry["candidates"],
                       scoring=entry["scoring"], slot_bits=int(entry["slot_bits"]), batch_size=batch_size)
        switcher.folder = Path(folder)
        return switcher

    def switch_to_saved(self, name: str, folder=None) -> AdaptiveReport:
        """Switch a packed model to a saved set by name: a checked load and a copy into the slot tables."""
        from .slotset import load_slot_set, packed_fingerprint

        folder = Path(folder) if folder is not None else self.folder
        if folder is None:
            raise UserError("switch_to_saved needs the slot_sets folder (for_saved_sets(model, folder) keeps it)")
        t0 = time.perf_counter()
        if self._fingerprint is None:
            self._fingerprint = packed_fingerprint(self.model)
        n_experts = {i: layer.n_experts for i, layer in self.layers.items()}
        slot_set = load_slot_set(folder, name, self._fingerprint, n_experts)
        report = self.switch_to_set(slot_set.to(self.target.device(next(iter(self.shapes)))), name)
        report.write_s = time.perf_counter() - t0  # the load from disk included
        return report

    def switch_for(self, name: str, windows: torch.Tensor) -> AdaptiveReport:
        """Switch to dataset `name`: its saved set when this switcher was opened on saved sets holding one (a copy),
        else a switch to its `windows`."""
        from .slotset import saved_names

        if self.folder is not None and name in saved_names(self.folder):
            return self.switch_to_saved(name)
        return self.switch_to(windows)

    def remember(self, name: str) -> None:
        """Keep the active set under `name` (host memory), for the export's slot_sets/."""
        if self.active is not None:
            self.history[name] = self.active.to("cpu")

    def switch_to(self, windows: torch.Tensor) -> AdaptiveReport:
        t0 = time.perf_counter()
        if self.master is None:
            raise UserError("a switch to new windows restores from the experts' FP16 weights: give the switcher a "
                            "master (dynamo.switching.master.DiskMaster(<the FP16 checkpoint>, model)), or switch "
                            "to a saved set by name")
        windows = check_token_windows(windows, self.vocab)
        chosen, expected, held, select_s = self._select_streaming(windows)
        t1 = time.perf_counter()
        slot_set = self.build_set(chosen)
        self._factors = {}
        written = self.target.apply(slot_set)
        self.active = slot_set
        t2 = time.perf_counter()
        report = self._report(expected, (t1 - t0) - select_s, select_s, t2 - t1, written)
        report.held_nbytes_by_layer = held
        report.held_nbytes_peak = max(held, default=0)
        report.top = self._top(chosen)
        return report

    def switch_to_set(self, slot_set: SlotSet, name: str = "saved") -> AdaptiveReport:
        """Write a saved (or earlier computed) slot set: no profiling, no master needed."""
        t0 = time.perf_counter()
        if slot_set.slot_bits != self.slot_bits or slot_set.group_size != self.group_size:
            raise UserError(f"slot set '{name}' holds {slot_set.slot_bits}-bit slots in groups of "
                            f"{slot_set.group_size}; this switcher uses {self.slot_bits} and {self.group_size}")
        written = self.target.apply(slot_set)
        self.active = slot_set
        report = self._report(0.0, 0.0, 0.0, time.perf_counter() - t0, written)
        report.source = name
        return report

    def _select_streaming(self, windows: torch.Tensor) -> tuple[Candidates, float, list[int], float]:
        """Profile and score one MoE layer at a time, keeping only the running best set."""
        state = {"best": None, "total": 0.0, "select_s": 0.0}
        held: list[int] = []
        self._factors = {}

        def on_layer(index: int, stats) -> bool:
            if stats is None:
                return False
            t = time.perf_counter()
            layer_candidates, err = self._layer_candidates(self.layers[index], stats.routed)
            before = state["best"].to(layer_candidates.gain.device) if state["best"] is not None else None
            merged = layer_candidates if before is None else Candidates.cat([before, layer_candidates])
            if LOWRANK in self.kinds:  # row/column gains where the provisional choice also takes low-rank components
                provisional = merged.best_of_each_kind(KEEP * self.budget_nbytes).greedy_within(self.budget_nbytes)
                layer_candidates = self._rescore_after_lowrank(self.layers[index], stats.routed, layer_candidates,
                                                               provisional)
                merged = layer_candidates if before is None else Candidates.cat([before, layer_candidates])
            state["best"] = merged.best_of_each_kind(KEEP * self.budget_nbytes)
            self._keep_factors_of(state["best"])
            state["total"] += err
            hessians = sum(h.numel() * h.element_size() for h in (stats.routed.hessian_in, stats.routed.hessian_mid)
                           if h is not None)
            factors = sum(t.numel() * t.element_size() for pair in self._factors.values() for t in pair)
            held.append(hessians + layer_candidates.nbytes + state["best"].nbytes + factors)
            state["select_s"] += time.perf_counter() - t
            return False

        capture_sequential(self.model, windows, on_layer, batch_size=self.batch_size,
                           hessians=self.scoring == "hessian", hessian_weighting="router", keep_hessians=False,
                           expert_outputs=self.target.expert_outputs)
        t = time.perf_counter()
        kept = state["best"] if state["best"] is not None else Candidates.empty("cpu")
        best = self._without_raised_experts_pieces(kept, kept.greedy_within(self.budget_nbytes))
        expected = float(best.gain.sum()) / state["total"] if state["total"] > 0 else 0.0
        return best, expected, held, state["select_s"] + time.perf_counter() - t

    def _keep_factors_of(self, kept: Candidates) -> None:
        """Drop the low-rank factors of components the running set no longer holds (each matrix keeps its
        components up to the highest one still in the set)."""
        lr = kept.take(kept.kind == LOWRANK)
        top: dict[Key, int] = {}
        for i, e, p, k in zip(lr.layer.tolist(), lr.expert.tolist(), lr.proj.tolist(), lr.index.tolist()):
            key = (i, e, PROJECTIONS[p])
            top[key] = max(top.get(key, -1), k)
        # a copy where a matrix keeps fewer components: a slice would keep the whole tensor alive
        self._factors = {key: (a, bt) if top[key] + 1 == len(a) else (a[:top[key] + 1].clone(),
                                                                       bt[:top[key] + 1].clone())
                         for key, (a, bt) in self._factors.items() if key in top}

    def _without_raised_experts_pieces(self, kept: Candidates, chosen: Candidates) -> Candidates:
        """The greedy choice again without the rows/columns of experts it raised to 8 bits whole (they would
        be overwritten): their bytes go to the next pieces in line."""
        raised = chosen.kind == EXPERT
        if not bool(raised.any()):
            return chosen
        ids = kept.layer.long() * (1 << 20) + kept.expert.long()
        raised_ids = chosen.layer[raised].long() * (1 << 20) + chosen.expert[raised].long()
        covered = torch.isin(ids, raised_ids) & (kept.kind != EXPERT)
        return kept.take(~covered).greedy_within(self.budget_nbytes)

    def _layer_candidates(self, layer, routed) -> tuple[Candidates, float]:
        """Every candidate of one MoE layer, scored on the statistics' device in float32.

        The per-expert reductions go into buffers allocated once per layer: nothing small and long-lived is
        allocated between the large per-expert temporaries, which would fragment the host heap (glibc keeps
        such freed memory: at OLMoE's real width the process grew by ~6 GiB per scored layer before)."""
        device = routed.tokens.device
        dtype = self.score_dtype
        wsq = self._wsq(routed)
        spec8 = QSpec(8, self.group_size)
        n_experts = layer.n_experts
        shapes = {p: layer.shape(p) for p in PROJECTIONS}
        rows = {p: torch.zeros(n_experts, shapes[p][0], dtype=torch.float32, device=device) for p in PROJECTIONS}
        cols = {p: torch.zeros(n_experts, shapes[p][1], dtype=torch.float32, device=device) for p in PROJECTIONS}
        raised, total, lowrank = [], 0.0, []
        rank_cap = min(LOWRANK_MAX_RANK, max(1, KEEP * self.budget_nbytes //
                                             min(self.lowrank_nbytes(*shapes[p]) for p in PROJECTIONS)))
        for e, n in enumerate(routed.tokens.tolist()):
            if n == 0:
                continue
            down_master = self.master.get((layer.index, e, "down")).to(device, dtype)
            expert_err, expert_err8, expert_extra = 0.0, 0.0, 0
            for p in PROJECTIONS:
                key = (layer.index, e, p)
                master, d, hess, diag, gain = self._matrix_terms(layer.index, routed, wsq, e, p, down_master)
                g = d @ hess if hess is not None else d * diag[None, :]
                row_red, col_red, err = _reductions(d, g, diag, gain)
                if LOWRANK in self.kinds:
                    a, bt, lr_gain = lowrank_components(d, g, hess, diag, gain, rank_cap)
                    del g
                    keep = lr_gain > 0
                    if bool(keep.any()):  # gains of a prefix: stop at the first component that removes nothing
                        count = int(keep.int().cumprod(0).sum())
                        self._factors[key] = (a[:count].to("cpu", torch.float16), bt[:count].to("cpu", torch.float16))
                        lowrank.append(Candidates.of(lr_gain[:count], self.lowrank_nbytes(*shapes[p]), layer.index, e,
                                                     PROJECTIONS.index(p), LOWRANK,
                                                     torch.arange(count, device=device)))
                rows[p][e] = row_red
                cols[p][e] = col_red
                total += err
                expert_err += err
                bits = self.target.bq_bits(key)
                if EXPERT in self.kinds and bits < 8:
                    d8 = master - quantize_rtn(master, spec8).dequantize().to(dtype)
                    g8 = d8 @ hess if hess is not None else d8 * diag[None, :]
                    expert_err8 += _reductions(d8, g8, diag, gain)[2]
                    out, inp = shapes[p]
                    expert_extra += (8 - bits) * out * inp // 8   # 8-bit codes replace the BQ codes in place
            if expert_extra > 0 and expert_err > expert_err8:
                raised.append((e, expert_err - expert_err8, expert_extra))
        parts = []
        for pi, p in enumerate(PROJECTIONS):
            out, inp = shapes[p]
            kinds = [(ROW, rows[p], self.slot_nbytes(inp))] if ROW in self.kinds else []
            if COLUMN in self.kinds:
                kinds.append((COLUMN, cols[p], self.slot_nbytes(out)))
            for kind, gains, cost in kinds:
                expert, index = torch.nonzero(gains > 0, as_tuple=True)
                parts.append(Candidates.of(gains[expert, index], cost, layer.index, expert, pi, kind, index))
        for e, reduction, extra in raised:
            parts.append(Candidates.of(torch.tensor([reduction], device=device), extra, layer.index, e, -1, EXPERT,
                                       torch.tensor([-1], device=device)))
        parts += lowrank
        return (Candidates.cat(parts) if parts else Candidates.empty(device)), total

    def _wsq(self, routed) -> dict[str, torch.Tensor]:
        """The layer's per-expert mean squares of each projection's inputs and outputs, in the scoring dtype."""
        return {u: routed.channels[u]["wsq"].to(self.score_dtype) for u in ("input", "neuron", "gate", "up")}

    def _matrix_terms(self, index: int, routed, wsq: dict, e: int, p: str, down_master: torch.Tensor):
        """(master, error d = master - BQ, H or None, H's diagonal, per-row output weight or None) of one matrix:
        what every candidate of it is scored with. Gate/up rows are weighted by how far their error reaches the
        expert's output (first order: ||W_down[:, r]||^2 E[h_r^2] / E[y_r^2])."""
        device, dtype = down_master.device, down_master.dtype
        key = (index, e, p)
        master = down_master if p == "down" else self.master.get(key).to(device, dtype)
        d = master - self.target.bq(key).to(device, dtype)
        gain = None
        if p != "down" and self.scoring != "local":
            gain = down_master.square().sum(0) * wsq["neuron"][e] / wsq[p][e].clamp_min(1e-12)
        h, diag = ((routed.hessian_mid, wsq["neuron"]) if p == "down" else (routed.hessian_in, wsq["input"]))
        hess = h[e].to(dtype) if self.scoring == "hessian" else None
        return master, d, hess, (torch.diagonal(hess) if hess is not None else diag[e]), gain

    def _rescore_after_lowrank(self, layer, routed, mine: Candidates, provisional: Candidates) -> Candidates:
        """Rows and columns of this layer's matrices that the provisional choice also corrects by low rank,
        scored again on the error the low-rank path leaves (the order the slot table applies them in): scored on
        the full error, a row counts again what the components already removed. `mine`: the layer's candidates;
        `provisional`: the greedy choice over the running set with this layer in it."""
        lr = provisional.take((provisional.kind == LOWRANK) & (provisional.layer == layer.index))
        if not len(lr) or not ({ROW, COLUMN} & set(self.kinds)):
            return mine
        device, dtype = routed.tokens.device, self.score_dtype
        wsq = self._wsq(routed)
        ranks: dict[tuple[int, int], int] = {}
        for e, pi, k in zip(lr.expert.tolist(), lr.proj.tolist(), lr.index.tolist()):
            ranks[(e, pi)] = max(ranks.get((e, pi), 0), k + 1)
        gains = mine.gain.clone()
        for (e, pi), rank in ranks.items():
            p = PROJECTIONS[pi]
            down_master = self.master.get((layer.index, e, "down")).to(device, dtype)
            _, d, hess, diag, gain = self._matrix_terms(layer.index, routed, wsq, e, p, down_master)
            a, bt = (t[:rank].to(device, torch.float32) for t in self._factors[(layer.index, e, p)])
            d = d - (self._as_held(bt).T @ self._as_held(a)).to(dtype)
            g = d @ hess if hess is not None else d * diag[None, :]
            row_red, col_red, _ = _reductions(d, g, diag, gain)
            for kind, red in ((ROW, row_red), (COLUMN, col_red)):
                which = (mine.expert == e) & (mine.proj == pi) & (mine.kind == kind)
                gains[which] = red[mine.index[which].long()].float()
        mine = Candidates(gains, *(getattr(mine, f) for f in Candidates.FIELDS[1:]))
        return mine.take(mine.gain > 0)

    # --- the slot set -----------------------------------------------------------------------

    def build_set(self, chosen: Candidates) -> SlotSet:
        """The chosen pieces' values, per matrix in the order the slot table adds them: the low-rank components
        (their factors from the profile), then the row deltas measured after them, then the column deltas
        measured after the rows; whole 8-bit matrices for raised experts."""
        chosen = chosen.to("cpu")
        slot_set = SlotSet(group_size=self.group_size, slot_bits=self.slot_bits)
        spec8 = QSpec(8, self.group_size)
        for i in sorted(set(chosen.layer.tolist())):
            layer = self.layers[i]
            here = chosen.take(chosen.layer == i)
            groups = {}
            for e in here.expert[here.kind == EXPERT].tolist():
                for p in PROJECTIONS:
                    slot_set.experts8[(i, e, p)] = quantize_rtn(self.master.get((i, e, p)).float(), spec8)
            for pi, p in enumerate(PROJECTIONS):
                mine = here.take((here.proj == pi) & (here.kind != EXPERT))
                if not len(mine):
                    continue
                parts = {"rows": [], "cols": [], "lowrank": []}
                for e in sorted(set(mine.expert.tolist())):
                    key = (i, e, p)
                    bq = self.target.bq(key)
                    master = self.master.get(key).to(bq.device, torch.float32)
                    which = {kind: mine.index[(mine.expert == e) & (mine.kind == kind)].long().sort().values.to(bq.device)
                             for kind in (ROW, COLUMN, LOWRANK)}
                    if which[LOWRANK].numel():
                        a, bt = (t.to(bq.device, torch.float32)[which[LOWRANK]] for t in self._factors[key])
                        parts["lowrank"].append((e, which[LOWRANK], a, bt))
                        bq += self._as_held(bt).T @ self._as_held(a)
                    rows, cols = which[ROW], which[COLUMN]
                    row_deltas = master[rows] - bq[rows]
                    # the columns see the rows as the slot table will hold them
                    bq[rows] += self._as_held(row_deltas)
                    parts["rows"].append((e, rows, row_deltas))
                    parts["cols"].append((e, cols, (master[:, cols] - bq[:, cols]).T))
                for kind in ("rows", "cols"):
                    group = self._group(layer.n_experts, parts[kind])
                    if group is not None:
                        groups[(p, kind)] = group
                if parts["lowrank"]:
                    groups[(p, "lowrank")] = LowRankGroup.build(layer.n_experts, *_flat(parts["lowrank"]),
                                                                self.slot_bits, self.group_size)
            if groups:
                slot_set.tables[i] = SlotTable(layer.n_experts, groups)
        return slot_set

    def _as_held(self, values: torch.Tensor) -> torch.Tensor:
        """Slot values [S, L] as the slot table will hold them (quantized per slot): what later pieces see."""
        return dequantize_deltas(*quantize_deltas(values, self.slot_bits, self.group_size), self.group_size)

    def _group(self, n_experts: int, parts: list):
        """One SlotGroup from per-expert (expert, indices, deltas [n, L]) parts; None when they hold no slot."""
        from dynamo_kernels.slots import SlotGroup

        if not any(idx.numel() for _, idx, _ in parts):
            return None
        return SlotGroup.build(n_experts, *_flat(parts), self.slot_bits, self.group_size)

    # --- accounting -------------------------------------------------------------------------

    def slot_nbytes(self, length: int) -> int:
        """Device bytes of one row/column slot of `length` values, as the slot table holds it."""
        return slot_nbytes(length, self.slot_bits, self.group_size)

    def lowrank_nbytes(self, out: int, inp: int) -> int:
        """Device bytes of one rank-1 component of an [out, inp] matrix: an input and an output factor slot."""
        return self.slot_nbytes(inp) + self.slot_nbytes(out)

    def extra_nbytes(self) -> int:
        """Device bytes of the active slots (raised experts: their codes' bytes over BQ's)."""
        if self.active is None:
            return 0
        raised = sum((8 - self.target.bq_bits(k)) * q.codes.numel() // 8 for k, q in self.active.experts8.items())
        return sum(t.nbytes for t in self.active.tables.values()) + raised

    def exact_bits(self) -> float:
        """Per routed-expert weight: the BQ code width (8 for raised experts) plus the slots' code bits."""
        bits = sum(self.target.bq_bits(k) * a * b for k, (a, b) in self.shapes.items())
        if self.active is not None:
            bits += sum((8 - self.target.bq_bits(k)) * q.codes.numel() for k, q in self.active.experts8.items())
            bits += self.slot_bits * self.active.slot_values()
        return bits / self.routed_weights

    def _top(self, chosen: Candidates) -> list[dict]:
        ratio = chosen.gain / chosen.cost.float()
        order = torch.argsort(ratio, descending=True)[:5].tolist()
        return [{"kind": KIND_NAMES[int(chosen.kind[j])], "layer": int(chosen.layer[j]),
                 "expert": int(chosen.expert[j]),
                 "projection": PROJECTIONS[int(chosen.proj[j])] if int(chosen.proj[j]) >= 0 else "*",
                 "index": int(chosen.index[j]), "reduction_per_byte": float(ratio[j])} for j in order]

    def _report(self, expected: float, profile_s: float, select_s: float, write_s: float,
                written: int) -> AdaptiveReport:
        active = self.active or SlotSet()
        return AdaptiveReport(slots=active.counts(), extra_nbytes=self.extra_nbytes(),
                              budget_nbytes=self.budget_nbytes, expected_reduction=expected, profile_s=profile_s,
                              select_s=select_s, write_s=write_s, experts_changed=active.experts_changed(),
                              exact_bits=self.exact_bits(), weights_rewritten=written)

    def summary(self) -> SwitchSummary:
        return SwitchSummary("adaptive", self.candidates, self.budget_nbytes, "slot budget", extra={
                "candidates": self.candidates, "scoring": self.scoring, "slot_bits": self.slot_bits,
                "budget_frac": self.budget_frac, "budget_nbytes": self.budget_nbytes,
                "expert_fp16_nbytes": self.fp16_nbytes, "master_nbytes": self.master.nbytes if self.master else 0,
                "master_location": self.master.location if self.master else "none", "model_form": self.target.form,
                "slot_sets": str(self.folder) if self.folder is not None else None})

