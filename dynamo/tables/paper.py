"""The paper's Tables I-III on the hub models: our numbers beside the published ones."""

from __future__ import annotations

from .cells import fmt
from .records import HUB_MODELS, pick

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
            lines.append(f"| {model} | {quant} | {fmt(bits) or ('16' if r and quant == 'fp16' else '')} | "
                         f"{fmt(ppl.get('wikitext2'))} | {fmt(ppl.get('c4'))} | {paper_bits:g} | {wiki:.2f} | {c4:.2f} |")
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
            lines.append(f"| {model} | {quant} | " + " | ".join(fmt(a) for a in accs) + f" | {fmt(mean)} | {paper:.2f} |")
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
        lines.append(f"| {model} | " + " | ".join(fmt(x) for x in ours) + " | "
                     + " | ".join(str(x) for x in PAPER_TABLE_III[model]) + " |")
    return "\n".join(lines) + "\n"
