"""The embedded variant of the paper's Table II: multiple-choice accuracy with paired intervals."""

from __future__ import annotations

from pathlib import Path

from .. import stats
from ..eval.harness import MC_TASK
from .cells import NOT_SIGNIFICANT, SIGNIFICANT, ci_text, fmt, significance_mark
from .embedded import GPTQ3
from .records import MODELS, pick
from .samples import paired_interval

MC_NO_SAMPLES = "CI n/a (record predates per-question results)"


def render_table2_embedded(records: list[dict]) -> str:
    chosen = pick(records, ("table2_embedded",))
    vs_of = {"fp16": None, GPTQ3: "fp16", "dynamo_3bit": GPTQ3}
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
            ppl = fmt(r["metrics"][key].get("math"))
            if vs is not None and ppl:
                vs_key = "ppl_bq" if "ppl_bq" in vs["metrics"] else "ppl"
                ppl += " " + significance_mark(paired_interval("ppl", (vs, vs_key), (r, key), "math"), 1.0)
            limit = r["protocol"].get("lm_eval", {}).get("limit")
            diffs = [_accuracy_cell(vs, r, metric) if vs is not None else "" for metric in ("acc", "acc_norm")]
            lines.append(f"| {model} | {quant} | {vs_quant if vs else '-'} | {fmt(bits, 3) or '16'} | "
                         f"{fmt(mc.get('acc'), 3)} | {diffs[0]} | {fmt(mc.get('acc_norm'), 3)} | {diffs[1]} | "
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
    return f"{ci_text(interval, 3)} {significance_mark(interval, 0.0)}"
