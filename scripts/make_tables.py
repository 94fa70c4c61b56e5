"""Tables from run records: nothing in a table is typed by hand.

    python scripts/make_tables.py                 # every table below, into results/tables/
    python scripts/make_tables.py baselines       # one of them
    python scripts/make_tables.py --check         # rebuild in memory, fail if a committed table differs
    python scripts/make_tables.py --figures       # also the PPL-vs-bits (Pareto) figure of every method
    python scripts/make_tables.py --wandb         # also log the tables to W&B (offline; `wandb sync` later)

Each table reads the `result.json` records under results/runs/ (recursively), picks for every
(model, quant preset) the newest record made by the table's experiment presets, and writes Markdown with the
command that regenerates the runs, the PPL protocol, and the run ids it used.

Comparative tables mark every cell compared with a reference row (FP16, GPTQ-3bit, or BQ for a
DQS row: the `vs` column) by whether its 95% paired-bootstrap interval (dynamo.stats, over the
per-window losses beside each record) excludes no change, and list the intervals below.
`--wandb` also logs the written tables to W&B (dynamo.loggers.publish_tables).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere, like run.py

from dynamo import stats  # noqa: E402
from dynamo.eval.harness import MC_TASK  # noqa: E402
from dynamo.records import atomic_path  # noqa: E402

RUNS = REPO / "results" / "runs"
OUT = REPO / "results" / "tables"
MODELS = ("testbed-qwen-moe", "tiny-olmoe", "tiny-qwen-moe")  # the default (quantization-sensitive) first


@dataclass(frozen=True)
class Row:
    label: str
    quant: str          # quant preset
    key: str = "ppl"    # metrics key of its PPL: "ppl", or "ppl_bq" for BQ alone in a DynaMo run
    vs: str | None = None  # label of the reference row it is compared with (None: not compared)


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    experiments: tuple[str, ...]  # the experiment presets whose runs feed the table
    rows: tuple[Row, ...]          # in row order
    command: str
    gap_closed: tuple[str, str] | None = None  # (FP16 row, GPTQ-3bit row): add "% of that gap closed" on known domains
    dqs_bits: bool = False         # add the exact bits DQS ran at (cached channels at their active width)


_GPTQ3 = "gptq_3bit"
TABLES = {
    "baselines": TableSpec(
        "baselines", "Baselines on the embedded models (token PPL, every domain)", ("baselines_embedded",),
        (Row("fp16", "fp16"),) + tuple(Row(q, q, vs="fp16") for q in (
            "rtn_2bit", "rtn_3bit", "rtn_4bit", "gptq_2bit", "gptq_3bit", "gptq_4bit", "moeptq", "random_3bit",
            "bnb_nf4", "bnb_int8")),
        "python run.py -m experiment=baselines_embedded"),
    "dynamo_bq": TableSpec(
        "dynamo_bq", "DynaMo baseline quantization (BQ) against the baselines at ~3 bits", ("baselines_embedded", "dynamo_embedded"),
        (Row("fp16", "fp16"), Row(_GPTQ3, _GPTQ3, vs="fp16"), Row("moeptq", "moeptq", vs=_GPTQ3),
         Row("random_3bit", "random_3bit", vs=_GPTQ3), Row("DynaMo BQ, budget 3.0", "dynamo_3bit", "ppl_bq", _GPTQ3),
         Row("DynaMo BQ, budget 3.0, shared experts at 3 bits", "dynamo_3bit_equal", vs=_GPTQ3),
         Row("gptq_4bit", "gptq_4bit", vs=_GPTQ3), Row("DynaMo BQ, fcm (paper)", "dynamo_paper", "ppl_bq", _GPTQ3)),
        "python run.py -m experiment=baselines_embedded && python run.py -m experiment=dynamo_embedded",
        gap_closed=("fp16", _GPTQ3)),
    "dynamo_ablation": TableSpec(
        "dynamo_ablation", "Ablation in the shape of the paper's Table III: GPTQ -> BQ -> BQ + DQS",
        ("baselines_embedded", "dynamo_embedded"),
        (Row("FP16", "fp16"), Row("GPTQ-3bit", _GPTQ3, vs="FP16"),
         Row("BQ (budget 3.0)", "dynamo_3bit", "ppl_bq", "GPTQ-3bit"),
         Row("BQ + DQS (budget 3.0)", "dynamo_3bit", vs="BQ (budget 3.0)"),
         Row("BQ (fcm)", "dynamo_paper", "ppl_bq", "GPTQ-3bit"), Row("BQ + DQS (fcm)", "dynamo_paper", vs="BQ (fcm)")),
        "python run.py -m experiment=baselines_embedded && python run.py -m experiment=dynamo_embedded",
        dqs_bits=True),
}
KL_KEYS = {"ppl": "kl", "ppl_bq": "kl_bq"}  # the KL(FP16 || model) of the same pass as each PPL key
SIGNIFICANT, NOT_SIGNIFICANT, NO_CI = "†", "n.s.", "(no CI)"


def load_records(root: Path) -> list[dict]:
    records = []
    for path in sorted(root.rglob("result.json")):
        record = json.loads(path.read_text())
        record["_path"] = str(path.parent.relative_to(root))
        record["_dir"] = str(path.parent.resolve())
        records.append(record)
    return records


def pick(records: list[dict], experiments: tuple[str, ...], presets: set[str] | None = None,
         models: tuple[str, ...] = MODELS) -> dict[tuple[str, str], dict]:
    """Newest record per (model, quant) among the runs of `experiments` (only `presets`, when given);
    ties broken by run id."""
    chosen = {}
    for r in records:
        if _experiment(r) not in experiments or (presets is not None and r["quant"]["name"] not in presets) \
                or r["model"]["name"] not in models:
            continue
        key = (r["model"]["name"], r["quant"]["name"])
        if key not in chosen or (r["created_at"], r["_path"]) > (chosen[key]["created_at"], chosen[key]["_path"]):
            chosen[key] = r
    return chosen


def _bos_note(protocol: dict) -> str:
    """Windows of a model trained with BOS-led windows (model.bos_windows) hold one token fewer of text."""
    if protocol.get("bos_id") is None:
        return ""
    return f" (a BOS token and {protocol['seqlen'] - 1} text tokens, as the model was trained)"


def _experiment(record: dict) -> str | None:
    for override in record.get("overrides", []):
        key, _, value = override.lstrip("+").partition("=")
        if key == "experiment":
            return value
    return None


def _fmt(x: float | None, digits: int = 2) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


class StaleSamplesError(ValueError):
    """A per-window file does not reproduce its record's metric: it belongs to another run or was edited."""


@lru_cache(maxsize=None)
def _samples(run_dir: str, name: str) -> dict[str, np.ndarray]:
    return stats.load_samples(Path(run_dir), name)


def _units(record: dict, key: str, dataset: str) -> np.ndarray:
    """The per-window values behind record["metrics"][key][dataset]; MissingSamplesError when absent,
    StaleSamplesError when they do not give the recorded number (never silently compare other data)."""
    values = _samples(record["_dir"], stats.SAMPLE_FILES[key])
    if dataset not in values:
        raise stats.MissingSamplesError(f"{record['_path']}/{stats.SAMPLE_FILES[key]} lacks '{dataset}'")
    window, recorded = values[dataset], record["metrics"][key][dataset]
    pooled = math.exp(window.mean()) if key.startswith("ppl") else window.mean()
    if not math.isclose(pooled, recorded, rel_tol=1e-6, abs_tol=1e-12):
        raise StaleSamplesError(f"{record['_path']}/{stats.SAMPLE_FILES[key]} gives {key}.{dataset} = {pooled:.6g}, "
                                f"its result.json says {recorded:.6g}: restore the run folder's files or re-run it")
    return window


_INTERVALS: dict[tuple, stats.Interval | None] = {}  # one bootstrap per pair of runs and dataset, per call


def _interval(kind: str, ref: tuple[dict, str], row: tuple[dict, str], dataset: str) -> stats.Interval | None:
    """Interval of a (record, metrics key) row against its reference on one dataset: the PPL ratio
    (kind "ppl") or the share of KL removed (kind "kl"); None when the runs have no per-window data to pair."""
    key = (kind, ref[0]["_dir"], ref[1], row[0]["_dir"], row[1], dataset)
    if key not in _INTERVALS:
        try:
            a, b = _units(ref[0], ref[1], dataset), _units(row[0], row[1], dataset)
            _INTERVALS[key] = stats.ppl_ratio(a, b) if kind == "ppl" else stats.damage_removed(a, b)
        except (stats.MissingSamplesError, stats.PairingError):
            _INTERVALS[key] = None
    return _INTERVALS[key]


def _mark(interval: stats.Interval | None, null: float) -> str:
    if interval is None:
        return NO_CI
    return SIGNIFICANT if interval.excludes(null) else NOT_SIGNIFICANT


def _ci(interval: stats.Interval | None, digits: int = 4, scale: float = 1.0, unit: str = "") -> str:
    if interval is None:
        return "n/a"
    f = lambda x: f"{scale * x:.{digits}f}{unit}"  # noqa: E731
    return f"{f(interval.estimate)} [{f(interval.low)}, {f(interval.high)}]"


def _pct_change(interval: stats.Interval | None) -> str:
    """A PPL ratio as a signed % change: DQS effects of 0.01% need the digits a ratio would hide."""
    if interval is None:
        return "n/a"
    return (f"{100 * (interval.estimate - 1):+.3f} [{100 * (interval.low - 1):+.3f}, "
            f"{100 * (interval.high - 1):+.3f}]")


def render(spec: TableSpec, records: list[dict]) -> str:
    chosen = pick(records, spec.experiments, {row.quant for row in spec.rows})
    lines = [f"# {spec.title}", "", "Generated by `python scripts/make_tables.py` from the run records; "
             f"regenerate the runs with `{spec.command}`.", ""]
    for model in MODELS:
        rows = [(row, chosen[(model, row.quant)]) for row in spec.rows
                if (model, row.quant) in chosen and row.key in chosen[(model, row.quant)]["metrics"]]
        if not rows:
            continue
        by_label = {row.label: (record, row.key) for row, record in rows}
        compared = [(row, record) for row, record in rows if row.vs in by_label]
        known = rows[0][1]["dataset"]["known"]
        domains = list(rows[0][1]["metrics"]["ppl"])
        novel = [d for d in domains if d not in known]
        head = ["quant", "vs", "bits (experts)", "bits (all)", *[f"{d}*" for d in known], *novel]
        if spec.gap_closed:
            head.append("gap closed (known), 95% CI")
        if spec.dqs_bits:
            head.append("exact bits with DQS")
        lines += [f"## {model}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row, r in rows:
            bits = r["metrics"].get("avg_bits", {})
            vs = by_label.get(row.vs)
            cells = [row.label, row.vs if vs else "-", _fmt(bits.get("experts"), 3) or "16",
                     _fmt(bits.get("all"), 3) or "16"]
            for d in known + novel:
                mark = "" if vs is None else " " + _mark(_interval("ppl", vs, (r, row.key), d), 1.0)
                cells.append(_fmt(r["metrics"][row.key].get(d)) + mark)
            if spec.gap_closed:
                cells.append(_gap_closed_cell(by_label, spec.gap_closed, (r, row.key), known))
            if spec.dqs_bits:
                switches = r.get("switching", {}).get("switches", {}) if row.key == "ppl" else {}
                cells.append(f"{max(s['exact_bits'] for s in switches.values()):.3f} (max)" if switches else "")
            lines.append("| " + " | ".join(cells) + " |")
        protocol = next(iter(rows[0][1]["protocol"]["ppl"].values()))
        runs = sorted({r["_path"] for _, r in rows})
        lines += ["", f"\\* known domain (calibration and analysis data). Token PPL on the test splits, "
                      f"seqlen {protocol['seqlen']}{_bos_note(protocol)}, "
                      "every full window, tokenizer of the model. "
                      "bits = average code bits plus group scales/zeros.",
                  "Runs: " + ", ".join(f"`{p}`" for p in runs), ""]
        if compared:
            lines += [f"{SIGNIFICANT} = the PPL ratio to the `vs` row over the same test windows has a 95% "
                      f"interval that excludes 1 (a significant difference); {NOT_SIGNIFICANT} = the interval "
                      f"contains 1 (the test split cannot tell the two apart); {NO_CI} = a run lacks per-window "
                      "losses, or the two evaluated different windows. Paired bootstrap over windows (BCa, 2000 "
                      "resamples, seed 0; `dynamo.stats`); each cell is its own test, not corrected for multiple "
                      "comparisons.", ""]
        if spec.gap_closed:
            lines += ["gap closed = mean over known domains of (PPL_GPTQ3 - PPL) / (PPL_GPTQ3 - PPL_FP16), with its "
                      "95% interval from resampling each domain's windows (paired across the three runs); "
                      f"{SIGNIFICANT} = the interval excludes 0.", ""]
        if compared:
            lines += _interval_table(f"{model}: PPL change from the `vs` row, % (100 (ratio - 1)), 95% CI", "ppl",
                                     compared, by_label, known + novel, _pct_change)
        lines += _kl_tables(model, rows, by_label, known, novel)
    return "\n".join(lines).rstrip() + "\n"


def _interval_table(title: str, kind: str, compared, by_label, domains, fmt) -> list[str]:
    head = ["quant", "vs", *domains]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, r in compared:
        vs = by_label[row.vs]
        key = row.key if kind == "ppl" else KL_KEYS[row.key]
        ref_key = vs[1] if kind == "ppl" else KL_KEYS[vs[1]]
        cells = [fmt(_interval(kind, (vs[0], ref_key), (r, key), d)) for d in domains]
        lines.append("| " + " | ".join([row.label, row.vs, *cells]) + " |")
    return lines + [""]


def _kl_tables(model: str, rows, by_label, known, novel) -> list[str]:
    """Mean KL(FP16 || model) per domain, for rows whose record has it (metrics.kl*)."""
    has_kl = [(row, r) for row, r in rows if KL_KEYS.get(row.key) in r["metrics"]]
    if not has_kl:
        return []
    head = ["quant", "vs", *[f"{d}*" for d in known], *novel]
    lines = [f"### {model}: KL(FP16 || model), mean over predicted tokens", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    compared = []
    for row, r in has_kl:
        vs = by_label.get(row.vs)
        vs_has_kl = vs is not None and KL_KEYS.get(vs[1]) in vs[0]["metrics"]
        if vs_has_kl:
            compared.append((row, r))
        kl = r["metrics"][KL_KEYS[row.key]]
        cells = []
        for d in known + novel:
            mark = "" if not vs_has_kl else " " + _mark(
                _interval("kl", (vs[0], KL_KEYS[vs[1]]), (r, KL_KEYS[row.key]), d), 0.0)
            cells.append(("" if kl.get(d) is None else f"{kl[d]:.4g}") + mark)
        lines.append("| " + " | ".join([row.label, row.vs if vs_has_kl else "-", *cells]) + " |")
    lines += ["", f"{SIGNIFICANT} / {NOT_SIGNIFICANT}: whether the share of the `vs` row's KL that this row removes "
                  "(1 - KL / KL_vs, intervals below) has a 95% paired-bootstrap interval that excludes 0. No mark "
                  "and `vs` = -: the reference has no KL (FP16 itself, or a run without eval.reference).", ""]
    if compared:
        lines += _interval_table(f"{model}: KL damage removed relative to the `vs` row, 95% CI", "kl", compared,
                                 by_label, known + novel, lambda i: _ci(i, 1, 100.0, "%"))
    return lines


def _gap_closed_cell(by_label: dict, labels: tuple[str, str], row: tuple[dict, str], known: list[str]) -> str:
    """Mean share of the GPTQ-3bit -> FP16 gap closed on known domains, with its stratified interval."""
    fp16, gptq = (by_label.get(label) for label in labels)
    if fp16 is None or gptq is None or row[0] is fp16[0] or row[0] is gptq[0]:
        return ""
    ppl = {name: r["metrics"][key] for name, (r, key) in (("fp16", fp16), ("gptq", gptq), ("row", row))}
    usable = [d for d in known if ppl["gptq"][d] != ppl["fp16"][d]]  # no gap, no share of it
    if not usable:
        return ""
    try:
        interval = stats.mean_gap_closed([tuple(_units(r, key, d) for r, key in (fp16, gptq, row)) for d in usable])
    except (stats.MissingSamplesError, stats.PairingError):
        shares = [(ppl["gptq"][d] - ppl["row"][d]) / (ppl["gptq"][d] - ppl["fp16"][d]) for d in usable]
        return f"{100 * sum(shares) / len(shares):.0f}% {NO_CI}"
    return f"{_ci(interval, 0, 100.0, '%')} {_mark(interval, 0.0)}"


# The paper's published numbers (arXiv 2503.21135 v3, Tables I and III), printed beside ours.
# (model config, quant preset) -> (WikiText-2 PPL, C4 PPL, average expert bits)
PAPER_TABLE_I = {
    ("olmoe", "fp16"): (7.41, 11.42, 16), ("olmoe", "gptq_3bit"): (11.65, 18.86, 3.00),
    ("olmoe", "moeptq"): (15.44, 26.04, 3.26), ("olmoe", "dynamo_paper"): (9.64, 15.31, 2.95),
    ("moe-girl", "fp16"): (8.43, 13.13, 16), ("moe-girl", "gptq_3bit"): (12.77, 21.38, 3.00),
    ("moe-girl", "moeptq"): (16.88, 29.40, 3.26), ("moe-girl", "dynamo_paper"): (10.47, 17.87, 2.89),
    ("qwen-moe", "fp16"): (7.02, 10.03, 16), ("qwen-moe", "gptq_3bit"): (10.99, 20.84, 3.00),
    ("qwen-moe", "moeptq"): (9.93, 18.49, 3.35), ("qwen-moe", "dynamo_paper"): (8.51, 14.24, 3.05),
    ("deepseek-moe", "fp16"): (7.36, 9.22, 16), ("deepseek-moe", "gptq_3bit"): (10.47, 15.19, 3.00),
    ("deepseek-moe", "moeptq"): (8.49, 15.61, 3.31), ("deepseek-moe", "dynamo_paper"): (7.94, 11.49, 2.98),
}
# model config -> WikiText-2 PPL of GPTQ-3bit, BQ only, BQ + DQS
PAPER_TABLE_III = {"olmoe": (11.65, 10.78, 9.64), "moe-girl": (12.77, 11.23, 10.47),
                   "qwen-moe": (10.99, 9.82, 8.51), "deepseek-moe": (10.47, 8.52, 7.94)}
HUB_MODELS = ("olmoe", "moe-girl", "qwen-moe", "deepseek-moe")
# model config -> mean zero-shot accuracy (%) over the six tasks: FP16, GPTQ-3bit, DynaMo (paper Table II)
PAPER_TABLE_II = {"olmoe": (51.10, 46.43, 48.94), "moe-girl": (51.30, 46.86, 48.71),
                  "qwen-moe": (55.79, 46.85, 50.62), "deepseek-moe": (60.99, 57.43, 59.51)}
ZERO_SHOT = ("arc_challenge", "arc_easy", "rte", "piqa", "copa", "cb")


def render_table1(records: list[dict]) -> str:
    chosen = pick(records, ("table1_ppl",), models=HUB_MODELS)
    lines = ["# Paper Table I: token PPL, WikiText-2 / C4 (seqlen 2048)", "",
             "Ours from `python run.py -m experiment=table1_ppl` (DynaMo = BQ + DQS, `dynamo_paper`); the paper's "
             "published numbers beside them. Empty cells: no record yet (these runs need the hub and a GPU).", "",
             "| model | quant | bits (ours) | Wiki (ours) | C4 (ours) | bits (paper) | Wiki (paper) | C4 (paper) |",
             "|---|---|---|---|---|---|---|---|"]
    for model in HUB_MODELS:
        for quant in ("fp16", "gptq_3bit", "moeptq", "dynamo_paper"):
            r = chosen.get((model, quant))
            ppl = r["metrics"]["ppl"] if r else {}
            bits = r["metrics"].get("avg_bits", {}).get("experts_codes_only") if r else None
            wiki, c4, paper_bits = PAPER_TABLE_I[(model, quant)]
            lines.append(f"| {model} | {quant} | {_fmt(bits) or ('16' if r and quant == 'fp16' else '')} | "
                         f"{_fmt(ppl.get('wikitext2'))} | {_fmt(ppl.get('c4'))} | {paper_bits:g} | {wiki:.2f} | {c4:.2f} |")
    return "\n".join(lines) + "\n"


def render_table2(records: list[dict]) -> str:
    quants = ("fp16", "gptq_3bit", "dynamo_paper")
    chosen = pick(records, ("table2_zeroshot",), models=HUB_MODELS)
    lines = ["# Paper Table II: zero-shot accuracy (%), lm-eval `acc`", "",
             "Ours from `python run.py -m experiment=table2_zeroshot`; the paper's six-task means beside them.", "",
             "| model | quant | " + " | ".join(ZERO_SHOT) + " | mean (ours) | mean (paper) |",
             "|---|---|" + "---|" * (len(ZERO_SHOT) + 2)]
    for model in HUB_MODELS:
        for quant, paper in zip(quants, PAPER_TABLE_II[model]):
            r = chosen.get((model, quant))
            lm = r["metrics"].get("lm_eval", {}) if r else {}
            accs = [100 * lm[t]["acc"] if t in lm and "acc" in lm[t] else None for t in ZERO_SHOT]
            mean = sum(accs) / len(accs) if all(a is not None for a in accs) else None
            lines.append(f"| {model} | {quant} | " + " | ".join(_fmt(a) for a in accs) + f" | {_fmt(mean)} | {paper:.2f} |")
    return "\n".join(lines) + "\n"


def render_table3(records: list[dict]) -> str:
    chosen = pick(records, ("table3_ablation",), models=HUB_MODELS)
    lines = ["# Paper Table III: ablation, WikiText-2 PPL (seqlen 2048): GPTQ-3bit -> BQ -> BQ + DQS", "",
             "Ours from `python run.py -m experiment=table3_ablation`; the paper's numbers beside them.", "",
             "| model | GPTQ (ours) | BQ (ours) | BQ + DQS (ours) | GPTQ (paper) | BQ (paper) | BQ + DQS (paper) |",
             "|---|---|---|---|---|---|---|"]
    for model in HUB_MODELS:
        gptq, dyn = chosen.get((model, "gptq_3bit")), chosen.get((model, "dynamo_paper"))
        ours = [gptq["metrics"]["ppl"].get("wikitext2") if gptq else None,
                dyn["metrics"].get("ppl_bq", {}).get("wikitext2") if dyn else None,
                dyn["metrics"]["ppl"].get("wikitext2") if dyn else None]
        lines.append(f"| {model} | " + " | ".join(_fmt(x) for x in ours) + " | "
                     + " | ".join(str(x) for x in PAPER_TABLE_III[model]) + " |")
    return "\n".join(lines) + "\n"


MC_NO_SAMPLES = "CI n/a (record predates per-question results)"


def render_table2_embedded(records: list[dict]) -> str:
    chosen = pick(records, ("table2_embedded",))
    vs_of = {"fp16": None, _GPTQ3: "fp16", "dynamo_3bit": _GPTQ3}
    lines = ["# Embedded variant of paper Table II: multiple-choice accuracy (lm-eval)", "",
             "`dynamo_math_mc`: questions generated from the math test split, the true answer among 3 "
             "distractors (chance 25%). Ours from `python run.py -m experiment=table2_embedded`; DynaMo is "
             "evaluated as BQ (lm-eval tasks are not one dataset to switch to).", "",
             "| model | quant | vs | bits (experts) | acc | acc - acc(vs), 95% CI | acc_norm | acc_norm - acc_norm(vs), 95% CI "
             "| questions | math PPL |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        for quant, vs_quant in vs_of.items():
            r = chosen.get((model, quant))
            if r is None:
                continue
            vs = chosen.get((model, vs_quant))
            mc = r["metrics"].get("lm_eval", {}).get(MC_TASK, {})
            bits = r["metrics"].get("avg_bits", {}).get("experts")
            key = "ppl_bq" if "ppl_bq" in r["metrics"] else "ppl"
            ppl = _fmt(r["metrics"][key].get("math"))
            if vs is not None and ppl:
                vs_key = "ppl_bq" if "ppl_bq" in vs["metrics"] else "ppl"
                ppl += " " + _mark(_interval("ppl", (vs, vs_key), (r, key), "math"), 1.0)
            limit = r["protocol"].get("lm_eval", {}).get("limit")
            diffs = [_accuracy_cell(vs, r, metric) if vs is not None else "" for metric in ("acc", "acc_norm")]
            lines.append(f"| {model} | {quant} | {vs_quant if vs else '-'} | {_fmt(bits, 3) or '16'} | "
                         f"{_fmt(mc.get('acc'), 3)} | {diffs[0]} | {_fmt(mc.get('acc_norm'), 3)} | {diffs[1]} | "
                         f"{'' if limit is None else int(limit)} | {ppl} |")
    lines += ["", "Accuracy differences: paired bootstrap over the same questions (BCa, 2000 resamples, seed 0; "
                  f"`dynamo.stats`), from each run's per-question `{stats.MC_CORRECT_FILE}`; {SIGNIFICANT} = the 95% "
                  f"interval excludes 0. math PPL: {SIGNIFICANT} / {NOT_SIGNIFICANT} = the PPL ratio to the `vs` "
                  "row has a 95% interval that excludes / contains 1 (paired over windows)."]
    return "\n".join(lines) + "\n"


def _accuracy_cell(vs: dict, row: dict, metric: str) -> str:
    try:
        a, b = (stats.load_mc_correct(Path(r["_dir"])) for r in (vs, row))
        if MC_TASK not in a or MC_TASK not in b:
            raise stats.MissingSamplesError(MC_TASK)
        interval = stats.accuracy_difference(a[MC_TASK], b[MC_TASK], metric)
    except stats.MissingSamplesError:
        return MC_NO_SAMPLES
    except stats.PairingError as err:
        return f"CI n/a ({err})"
    return f"{_ci(interval, 3)} {_mark(interval, 0.0)}"


def render_overheads(records: list[dict]) -> str:
    """The paper's overhead table on the embedded models, from the DynaMo records' own timings."""
    chosen = pick(records, ("dynamo_embedded",))
    lines = ["# Overheads of DynaMo on the embedded models (paper: analysis 14.9-17.3% of offline time, "
             "switching 7.7-10.7% of online time, cache ~1% of weights)", "",
             "From the records of `python run.py -m experiment=dynamo_embedded` (CPU; threads: the record's "
             "`device.threads`, as compared seconds need the same count). Analysis share = "
             "capture seconds / (capture + quantization). Switching share = all switches / the BQ + DQS "
             "evaluation pass that contains them. Rewrite = the cache lookup and write of one switch (paper policy) "
             "or the slot writes (adaptive). Device bytes = the channel cache, or the adaptive slots at most.", "",
             "| model | quant | threads | analysis s | quantize s | analysis share | switch ms (median) | rewrite ms (median) "
             "| switching share | device bytes | device / expert bytes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in MODELS:
        for quant in ("dynamo_3bit", "dynamo_paper"):
            r = chosen.get((model, quant))
            if r is None or "switching" not in r:
                continue
            sw, an = r["switching"], r["analysis"]
            totals = sorted(x["total_s"] for x in sw["switches"].values())
            # the paper policy rewrites from its channel cache (requant_s); the adaptive one writes its slots
            rewrites = sorted(x.get("requant_s", x.get("write_s")) for x in sw["switches"].values())
            share = sum(totals) / r["timings"]["eval_ppl_s"]
            if "cache" in sw:
                device_bytes, fraction = sw["cache"]["nbytes"], sw["cache"]["fraction_of_expert_bytes_fp16"]
            else:  # adaptive: the most slot bytes any switch put on the device
                device_bytes = max(x["extra_nbytes"] for x in sw["switches"].values())
                fraction = device_bytes / sw["expert_fp16_nbytes"]
            lines.append(f"| {model} | {quant} | {r['device'].get('threads', '')} | {an['capture_s']:.1f} | {r['timings']['quantize_s']:.1f} | "
                         f"{100 * an['share_of_offline']:.1f}% | {1e3 * totals[len(totals) // 2]:.0f} | "
                         f"{1e3 * rewrites[len(rewrites) // 2]:.1f} | {100 * share:.1f}% | {device_bytes} | "
                         f"{100 * fraction:.3f}% |")
    return "\n".join(lines) + "\n"


RENDERERS = {**{name: (lambda records, spec=spec: render(spec, records)) for name, spec in TABLES.items()},
             "table1": render_table1, "table2": render_table2, "table2_embedded": render_table2_embedded, "table3": render_table3,
             "overheads": render_overheads}


def to_latex(markdown: str) -> str:
    """The Markdown tables of a rendered page as LaTeX tabulars (headings and legends become comments)."""
    out, rows = [], []

    def flush():
        if rows:
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
            out.append("\\begin{tabular}{l" + "r" * (len(cells[0]) - 1) + "}")
            out.append("\\hline")
            for i, row in enumerate(cells):
                out.append(" & ".join(_tex(c) for c in row) + " \\\\")
                if i == 0:
                    out.append("\\hline")
            out.extend(["\\hline", "\\end{tabular}", ""])
            rows.clear()

    for line in markdown.splitlines():
        if line.startswith("|---"):
            continue
        if line.startswith("|"):
            rows.append(line)
            continue
        flush()
        if line.startswith("#"):
            out.append("% " + line.lstrip("# "))
        elif line.strip():  # legends and notes travel with the tabular, as comments for the caption
            out.append("% " + line)
    flush()
    return "\n".join(out).rstrip() + "\n"


def _tex(cell: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("_", "\\_"), ("%", "\\%"), ("&", "\\&"), ("#", "\\#"),
                 ("->", "$\\to$"), ("*", "$^*$"), ("†", "$^\\dagger$")):
        cell = cell.replace(a, b)
    return cell


def write_pareto(records: list[dict], out: Path) -> list[Path]:
    """PPL (geometric mean over known, and over novel, domains) against average expert bits, one point
    per quant preset of the embedded sweeps; DynaMo runs add their BQ-only point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen, written = pick(records, ("baselines_embedded", "dynamo_embedded")), []
    for model in MODELS:
        points = {}
        for (m, quant), r in sorted(chosen.items()):
            bits = r["metrics"].get("avg_bits", {}).get("experts")
            if m != model or bits is None or quant.startswith("bnb_int8"):
                continue
            known = r["dataset"]["known"]
            for label, key in ((quant, "ppl"), (f"{quant} (BQ)", "ppl_bq")):
                ppl = r["metrics"].get(key)
                if ppl:
                    geo = lambda names: math.exp(sum(math.log(ppl[d]) for d in names) / len(names))  # noqa: E731
                    points[label] = (bits, geo(known), geo([d for d in ppl if d not in known]))
        if not points:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, k, title in ((axes[0], 1, "known domains"), (axes[1], 2, "novel domains")):
            for label, p in sorted(points.items()):
                marker = "*" if label.startswith("dynamo") else "o"
                ax.scatter(p[0], p[k], marker=marker, s=60 if marker == "*" else 25)
                ax.annotate(label, (p[0], p[k]), fontsize=6, xytext=(3, 2), textcoords="offset points")
            ax.set_xlabel("average bits per routed-expert weight (scales/zeros counted)")
            ax.set_ylabel("PPL, geometric mean")
            ax.set_title(f"{model}: {title}", fontsize=9)
        path = out / f"pareto_{model}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="*", help=f"default: all of {', '.join(RENDERERS)}")
    parser.add_argument("--runs", type=Path, default=RUNS)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="compare with the committed tables, write nothing")
    parser.add_argument("--figures", action="store_true", help="also write pareto_<model>.png (not --check'ed)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the written tables to W&B as an artifact and wandb.Tables "
                             "(the run lands under <out>/wandb/; offline: `wandb sync` uploads it later)")
    parser.add_argument("--wandb-mode", choices=("offline", "online"), default="offline")
    args = parser.parse_args(argv)
    unknown = [t for t in args.tables if t not in RENDERERS]
    if unknown:
        parser.error(f"unknown table(s) {unknown}; choose from {', '.join(RENDERERS)}")
    _samples.cache_clear(), _INTERVALS.clear()  # files may have changed since an earlier call
    records = load_records(args.runs)
    stale, written = [], []
    try:  # every table rendered before any is written: an error leaves the committed set as it was
        pages = {name: RENDERERS[name](records) for name in args.tables or list(RENDERERS)}
    except StaleSamplesError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, markdown in pages.items():
        for path, text in ((args.out / f"{name}.md", markdown), (args.out / f"{name}.tex", to_latex(markdown))):
            if args.check:
                if not path.is_file() or path.read_text() != text:
                    stale.append(str(path))
                continue
            with atomic_path(path) as tmp:
                tmp.write_text(text)
            written.append(path)
            print(f"wrote {path}")
    if args.figures and not args.check:
        for path in write_pareto(records, args.out):
            print(f"wrote {path}")
    if args.wandb and written:
        from dynamo.config import LoggerBackend, LoggerConfig, WandbMode
        from dynamo.loggers import publish_tables

        cfg = LoggerConfig(name="wandb", backend=LoggerBackend.wandb, mode=WandbMode(args.wandb_mode))
        print(f"W&B ({args.wandb_mode}): {publish_tables(written, cfg, args.out)}")
    if stale:
        print("error: these tables differ from what the records give; run python scripts/make_tables.py: "
              + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
