"""AdaptiveSwitcher: the dataset-adaptive DQS (ours; `quant.switching.policy=adaptive`, the default).

Why: the paper's switch rewrites channels fixed offline as "the rows that vary most across the
known datasets"; on a novel dataset those are no better than random rows (measured: 0.0% of
BQ's KL damage removed). Here the channels are chosen per dataset, from its own calib split.

Kept: the FP16 master copy of every routed expert (`ExpertMaster`, host memory, taken before
quantization). On the device: BQ, plus slots worth at most `budget_frac` of the routed experts'
FP16 bytes: rows and columns at `slot_bits` (16: FP16 values; 8: RTN-8 codes with an fp16 scale
and zero per group, about half the bytes, so twice the slots) + an int32 index each; an expert
raised to 8 bits costs the extra bytes of its 8-bit codes over its BQ codes.

`switch_to(windows)`:
1. profile the windows (a routed capture of the model as it is, i.e. quantized): per expert, the
   router-weighted sum over its routed tokens of x_j^2 for every input column j of gate/up (the
   hidden state) and of down (the SwiGLU neuron h);
2. score every candidate by the expected output-error reduction of restoring it, with
   D = W_fp16 - W_bq and a_j those sums: row r: sum_j D_rj^2 a_j; input column j: a_j sum_r D_rj^2;
   a whole expert at 8 bits: its error at BQ minus its error at RTN-8 (same weighting). With
   `scoring=output` (default) errors of gate/up rows are carried to the expert's output: scaled by
   ||W_down[:, r]||^2 * E[h_r^2] / E[y_r^2] (first order: the neuron's relative error times its
   weight into the output); `local` scores every projection in its own output space;
3. choose the best set under ONE global byte budget over all layers, experts and projections
   (greedy by reduction per byte; rows and columns may overlap: their reductions are counted
   independently, a small over-estimate at a 1% budget);
4. write: the previous slots get their BQ values back, the new ones their FP16 (or RTN-8) values
   from the master. Every value is computed before any write, and a failed write puts every
   touched slice back, so a failed switch leaves the model bit-identical.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ..adapters import PROJECTIONS, moe_layers
from ..calibration import capture
from ..errors import UserError
from ..quant.plan import QuantPlan
from ..quant.rtn import quantize_rtn
from ..quant.spec import QSpec
from .store import Key
from .switch import check_token_windows

CANDIDATES = ("rows", "rows_cols", "experts8", "all")
SCORINGS = ("hessian", "output", "local")
INDEX_BYTES = 4     # int32 slot indices
VALUE_BYTES = 2     # FP16 slot values
ROW, COLUMN, EXPERT = 0, 1, 2


class ExpertMaster:
    """FP16 copies of every routed expert's weights, in host memory, taken before quantization."""

    def __init__(self, model, dtype: torch.dtype = torch.float16):
        self.weights: dict[Key, torch.Tensor] = {}
        for layer in moe_layers(model):
            for e in range(layer.n_experts):
                for p in PROJECTIONS:
                    self.weights[(layer.index, e, p)] = layer.weight(e, p).detach().to("cpu", dtype).clone()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())

    @property
    def fp16_nbytes(self) -> int:
        """The routed experts' weights at 2 bytes each: what the slot budget is a share of."""
        return sum(t.numel() for t in self.weights.values()) * VALUE_BYTES

    def validate(self, model) -> None:
        for layer in moe_layers(model):
            for e in range(layer.n_experts):
                for p in PROJECTIONS:
                    master = self.weights.get((layer.index, e, p))
                    if master is None or master.shape != layer.weight(e, p).shape:
                        raise UserError(f"the FP16 master copy does not match the model at layer {layer.index} "
                                        f"expert {e} {p}")


@dataclass
class Slot:
    """One restored piece of one expert matrix: a row, an input column, or the whole matrix."""

    key: Key
    kind: int                       # ROW, COLUMN or EXPERT
    index: int                      # row/column index (-1 for a whole matrix)
    bq: torch.Tensor | None = None  # the BQ values it covers (host), the way back

    def read(self, weight: torch.Tensor) -> torch.Tensor:
        if self.kind == ROW:
            return weight[self.index].clone()
        if self.kind == COLUMN:
            return weight[:, self.index].clone()
        return weight.clone()

    def write(self, weight: torch.Tensor, values: torch.Tensor) -> None:
        values = values.to(weight.device, weight.dtype)
        if self.kind == ROW:
            weight[self.index] = values
        elif self.kind == COLUMN:
            weight[:, self.index] = values
        else:
            weight.copy_(values)


@dataclass
class AdaptiveReport:
    slots: dict[str, int]             # rows / columns / experts8 written
    extra_nbytes: int                 # device-resident slot bytes
    budget_nbytes: int
    expected_reduction: float         # share of the scored BQ error the chosen set removes (profile's estimate)
    profile_s: float
    select_s: float
    write_s: float
    experts_changed: int              # experts holding at least one slot
    exact_bits: float                 # what the model holds: BQ codes, slots at 16 (or 8) bits
    weights_rewritten: int = 0
    top: list = field(default_factory=list)  # the highest-scored slots, for the log

    @property
    def total_s(self) -> float:
        return self.profile_s + self.select_s + self.write_s

    def to_dict(self) -> dict:
        return {**asdict(self), "total_s": self.total_s}


def _write(weight: torch.Tensor, slot: Slot, values: torch.Tensor) -> None:
    """One slot into the model. A module-level seam so tests can make writing fail half-way."""
    slot.write(weight, values)


class AdaptiveSwitcher:
    """Holds a BQ-quantized model; a switch restores the slots its new data needs most."""

    def __init__(self, model, plan: QuantPlan, master: ExpertMaster, *, budget_frac: float = 0.01,
                 candidates: str = "rows_cols", scoring: str = "hessian", slot_bits: int = 8, batch_size: int = 8):
        if candidates not in CANDIDATES:
            raise UserError(f"unknown quant.switching.candidates '{candidates}'; choose one of {', '.join(CANDIDATES)}")
        if scoring not in SCORINGS:
            raise UserError(f"unknown quant.switching.scoring '{scoring}'; choose one of {', '.join(SCORINGS)}")
        if not 0.0 < budget_frac < 1.0:
            raise UserError(f"quant.switching.budget_frac must be in (0, 1), got {budget_frac}")
        if slot_bits not in (16, 8):
            raise UserError(f"quant.switching.slot_bits must be 16 or 8, got {slot_bits}")
        master.validate(model)
        self.model, self.plan, self.master = model, plan, master
        self.candidates, self.scoring, self.batch_size = candidates, scoring, batch_size
        self.budget_frac, self.slot_bits = float(budget_frac), int(slot_bits)
        self.group_size = plan.default.group_size
        self.budget_nbytes = int(budget_frac * master.fp16_nbytes)
        self.layers = {layer.index: layer for layer in moe_layers(model)}
        self.vocab = model.get_input_embeddings().num_embeddings
        self.bq_bits: dict[Key, int] = {(i, e, p): plan.spec_for(i, e, p).bits
                                        for i, layer in self.layers.items() for e in range(layer.n_experts)
                                        for p in PROJECTIONS}
        self.slots: list[Slot] = []   # active, in write order

    # --- state ------------------------------------------------------------------------------

    def weight(self, key: Key) -> torch.Tensor:
        i, e, p = key
        return self.layers[i].weight(e, p)

    def bq_weight(self, key: Key) -> torch.Tensor:
        """The BQ values of one matrix: the model's, with the active slots' BQ values put back."""
        w = self.weight(key).detach().clone()
        for slot in reversed(self.slots):
            if slot.key == key:
                slot.write(w, slot.bq)
        return w

    def restore_bq(self) -> AdaptiveReport:
        """Back to BQ: every active slot gets its BQ values back."""
        t = time.perf_counter()
        self._commit([(s, s.bq) for s in reversed(self.slots)])
        self.slots = []
        return self._report({}, 0.0, 0.0, 0.0, time.perf_counter() - t, 0)

    # --- the switch -------------------------------------------------------------------------

    def switch_to(self, windows: torch.Tensor) -> AdaptiveReport:
        t0 = time.perf_counter()
        windows = check_token_windows(windows, self.vocab)
        self.master.validate(self.model)
        stats = capture(self.model, windows, batch_size=self.batch_size, hessians=self.scoring == "hessian",
                        hessian_weighting="router")
        t1 = time.perf_counter()
        chosen, expected, top = self.select(stats)
        t2 = time.perf_counter()
        writes, new_slots = self._plan_writes(chosen)
        self._commit(writes)
        self.slots = new_slots
        t3 = time.perf_counter()
        report = self._report({}, expected, t1 - t0, t2 - t1, t3 - t2, sum(v.numel() for _, v in writes))
        report.top = top
        return report

    def _reductions(self, d: torch.Tensor, second: tuple, gain: torch.Tensor | None):
        """(per-row, per-column reductions, total error) of restoring rows/columns of error matrix d [out, in].

        Output error of d over the profiled tokens: sum_r d_r^T H d_r, H = sum of router-weighted x x^T.
        Restoring row r removes d_r^T H d_r; restoring column j removes sum_r (2 d_rj (d_r H)_j - d_rj^2 H_jj).
        `diag`/`local`/`output` scoring keep only H's diagonal a (then both are sums of d^2 a)."""
        hessian, diag = second
        g = d @ hessian if hessian is not None else d * diag[None, :]
        dg = d * g
        w = gain[:, None] if gain is not None else 1.0
        rows = (dg * w).sum(1)
        cols = ((2 * dg - d.square() * diag[None, :]) * w).sum(0)
        return rows, cols, float(rows.sum())

    def _scores(self, stats) -> tuple[list, float]:
        """Every candidate: (reduction, cost bytes, slot kind, key, index); and the total scored BQ error."""
        cands, total = [], 0.0
        use_hessian = self.scoring == "hessian"
        spec8 = QSpec(8, self.plan.default.group_size, self.plan.default.sym)
        for i, layer in self.layers.items():
            routed = stats.layers[i].routed
            ch = {u: routed.channels[u]["wsq"].double().cpu() for u in ("input", "neuron", "gate", "up")}
            for e in range(layer.n_experts):
                if int(routed.tokens[e]) == 0:
                    continue
                second = {"in": (routed.hessian_in[e].double().cpu() if use_hessian else None, ch["input"][e]),
                          "mid": (routed.hessian_mid[e].double().cpu() if use_hessian else None, ch["neuron"][e])}
                if use_hessian:
                    second = {k: (h, torch.diagonal(h).clone()) for k, (h, _) in second.items()}
                down_master = self.master.weights[(i, e, "down")].double()
                expert_err, expert_err8, expert_extra = 0.0, 0.0, 0
                for p in PROJECTIONS:
                    key = (i, e, p)
                    master = self.master.weights[key].double()
                    d = master - self.bq_weight(key).double().cpu()   # [out, in]
                    gain = None
                    if p != "down" and self.scoring != "local":
                        # first order: neuron r's output error = its relative error times ||W_down[:, r]||
                        gain = down_master.square().sum(0) * ch["neuron"][e] / ch[p][e].clamp_min(1e-12)
                    sec = second["mid" if p == "down" else "in"]
                    row_red, col_red, err = self._reductions(d, sec, gain)
                    total += err
                    expert_err += err
                    out, inp = master.shape
                    if self.candidates in ("rows", "rows_cols", "all"):
                        cands += [(r, self.slot_nbytes(inp), ROW, key, j)
                                  for j, r in enumerate(row_red.tolist()) if r > 0]
                    if self.candidates in ("rows_cols", "all"):
                        cands += [(c, self.slot_nbytes(out), COLUMN, key, j)
                                  for j, c in enumerate(col_red.tolist()) if c > 0]
                    if self.candidates in ("experts8", "all") and self.bq_bits[key] < 8:
                        d8 = master - quantize_rtn(master.float(), spec8).dequantize().double()
                        expert_err8 += self._reductions(d8, sec, gain)[2]
                        # the 8-bit codes replace the BQ codes in place: the extra bytes are the difference
                        expert_extra += (8 - self.bq_bits[key]) * out * inp // 8
                if self.candidates in ("experts8", "all") and expert_extra > 0:
                    cands.append((expert_err - expert_err8, expert_extra, EXPERT, (i, e, "*"), -1))
        return cands, total

    def select(self, stats) -> tuple[list, float, list]:
        """The best candidates under the byte budget (greedy by reduction per byte)."""
        candidates, total = self._scores(stats)
        candidates.sort(key=lambda c: c[0] / c[1], reverse=True)
        chosen, spent, gained, experts8 = [], 0, 0.0, set()
        for c in candidates:
            reduction, cost, kind, key, j = c
            if spent + cost > self.budget_nbytes:
                continue
            if kind != EXPERT and key[:2] in experts8:
                continue  # already restored with its whole expert
            chosen.append(c)
            spent += cost
            gained += reduction
            if kind == EXPERT:
                experts8.add(key[:2])
            if self.budget_nbytes - spent < self.slot_nbytes(1):
                break
        if experts8:  # rows/columns of an expert chosen before its whole expert was: refunded, not written
            chosen = [c for c in chosen if c[2] == EXPERT or c[3][:2] not in experts8]
        top = [{"kind": ("row", "column", "expert8")[c[2]], "layer": c[3][0], "expert": c[3][1],
                "projection": c[3][2], "index": c[4], "reduction_per_byte": c[0] / c[1]} for c in chosen[:5]]
        return chosen, (gained / total if total > 0 else 0.0), top

    def _plan_writes(self, chosen: list) -> tuple[list, list[Slot]]:
        """(slot, values) writes that turn the active slots into `chosen`: BQ values back first."""
        writes = [(s, s.bq) for s in reversed(self.slots)]
        new_slots, bq_cache = [], {}
        spec8 = QSpec(8, self.plan.default.group_size, self.plan.default.sym)
        for _, _, kind, key, j in chosen:
            keys = [(key[0], key[1], p) for p in PROJECTIONS] if kind == EXPERT else [key]
            for k in keys:
                if k not in bq_cache:
                    bq_cache[k] = self.bq_weight(k).cpu()
                slot = Slot(k, kind, j)
                slot.bq = slot.read(bq_cache[k])
                master = self.master.weights[k]
                if kind == EXPERT:
                    values = quantize_rtn(master.float(), spec8).dequantize()
                elif self.slot_bits == 8:  # the slice on its own 8-bit grid (groups along it)
                    values = quantize_rtn(slot.read(master).float()[None], spec8).dequantize()[0]
                else:
                    values = slot.read(master)
                writes.append((slot, values))
                new_slots.append(slot)
        return writes, new_slots

    def _commit(self, writes: list) -> None:
        """Every write, or none: on failure the touched slices are put back in reverse order."""
        done = []
        try:
            for slot, values in writes:
                weight = self.weight(slot.key)
                previous = slot.read(weight)
                _write(weight, slot, values)
                done.append((slot, previous))
        except BaseException:
            for slot, previous in reversed(done):
                slot.write(self.weight(slot.key), previous)
            raise

    # --- accounting -------------------------------------------------------------------------

    def slot_nbytes(self, length: int) -> int:
        """Device bytes of one row/column slot of `length` values: FP16 values, or 8-bit codes with an
        fp16 scale and zero per group; plus its int32 index."""
        if self.slot_bits == 16:
            return length * VALUE_BYTES + INDEX_BYTES
        group = length if self.group_size == -1 else self.group_size
        return length + -(-length // group) * 2 * VALUE_BYTES + INDEX_BYTES

    def extra_nbytes(self) -> int:
        total = 0
        for s in self.slots:
            out, inp = self.master.weights[s.key].shape
            if s.kind == ROW:
                total += self.slot_nbytes(inp)
            elif s.kind == COLUMN:
                total += self.slot_nbytes(out)
            else:
                total += (8 - self.bq_bits[s.key]) * out * inp // 8
        return total

    def exact_bits(self) -> float:
        """Per routed-expert weight, the code width the model holds (slots at 16, or 8 for experts)."""
        bits = {k: torch.full(self.master.weights[k].shape, float(b)) for k, b in self.bq_bits.items()
                if any(s.key == k for s in self.slots)}
        for s in self.slots:
            width = 8.0 if s.kind == EXPERT else float(self.slot_bits)
            s.write(bits[s.key], torch.tensor(width).expand_as(s.read(bits[s.key])))
        total = sum(self.master.weights[k].numel() for k in self.bq_bits)
        exact = sum(b * self.master.weights[k].numel() for k, b in self.bq_bits.items() if k not in bits)
        exact += sum(float(t.sum()) for t in bits.values())
        return exact / total

    def _report(self, _unused, expected: float, profile_s: float, select_s: float, write_s: float,
                written: int) -> AdaptiveReport:
        kinds = {"rows": ROW, "columns": COLUMN, "experts8": EXPERT}
        counts = {name: sum(1 for s in self.slots if s.kind == k) for name, k in kinds.items()}
        counts["experts8"] //= len(PROJECTIONS)
        return AdaptiveReport(slots=counts, extra_nbytes=self.extra_nbytes(), budget_nbytes=self.budget_nbytes,
                              expected_reduction=expected, profile_s=profile_s, select_s=select_s, write_s=write_s,
                              experts_changed=len({s.key[:2] for s in self.slots}), exact_bits=self.exact_bits(),
                              weights_rewritten=written)

    def summary(self) -> dict:
        return {"policy": "adaptive", "candidates": self.candidates, "scoring": self.scoring, "slot_bits": self.slot_bits,
                "budget_frac": self.budget_frac, "budget_nbytes": self.budget_nbytes,
                "expert_fp16_nbytes": self.master.fp16_nbytes, "master_nbytes": self.master.nbytes,
                "master_location": "host"}
