"""lm-evaluation-harness (lm_eval 0.4.13) on an in-memory model, fully offline for local tasks.

Local tasks are YAML files plus JSONL data written by `build_local_tasks`; `run_lm_eval` runs
them (and any lm-eval hub task the caller's cache holds) through HFLM on a model object.
`evaluate_tasks` does the same and also keeps each question's 0/1 correctness (multiple-choice
tasks), so two runs' accuracies can be compared question by question (dynamo.stats).
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import yaml

from dynamo.errors import UserError
from dynamo.registry import register_eval_task


MC_TASK = "dynamo_math_mc"
N_DISTRACTORS = 3
_QA = re.compile(r"Question: (.*?)\nAnswer: (.*)", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def build_local_tasks(domains: dict[str, list[str]], workdir: Path, mc_source: list[str] | None = None,
                      seed: int = 0) -> list[str]:
    """Write lm-eval task YAMLs + JSONL data under workdir for the given domains.

    domains: {domain_name: list of test documents (plain strings)}. Each domain becomes a rolling
    log-likelihood task f"dynamo_{domain}" (word_perplexity, byte_perplexity, bits_per_byte, as
    lm-eval's wikitext task). mc_source (documents of "Question: ...\\nAnswer: ...\\n" blocks separated
    by blank lines) also gives the multiple_choice task "dynamo_math_mc": each question with its true
    answer and 3 distractors, deterministic from seed. Returns the task names written.
    Pass workdir as include_path to run_lm_eval.
    """
    workdir = Path(workdir).resolve()
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    names = []
    for domain, docs in domains.items():
        name = f"dynamo_{domain}"
        _write_jsonl(workdir / "data" / f"{name}.jsonl", [{"text": d} for d in docs if d.strip()])
        # doc_to_target names the column, so texts never pass through Jinja.
        _write_task(workdir, name, output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="text",
                    metric_list=[{"metric": m, "aggregation": agg, "higher_is_better": False} for m, agg in
                                 [("word_perplexity", "weighted_perplexity"),
                                  ("byte_perplexity", "weighted_perplexity"), ("bits_per_byte", "bits_per_byte")]])
        names.append(name)
    if mc_source is not None:
        _write_jsonl(workdir / "data" / f"{MC_TASK}.jsonl", math_mc_docs(mc_source, seed))
        _write_task(workdir, MC_TASK, output_type="multiple_choice", doc_to_text="prompt",
                    doc_to_target="label", doc_to_choice="choices",
                    metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                 for m in ("acc", "acc_norm")])
        names.append(MC_TASK)
    return names


# --- the tasks eval.lm_eval.tasks may name that we write (dynamo.registry.EVAL_TASKS) ---------------

@register_eval_task("suite")
def suite_tasks(documents: dict[str, list[str]], workdir: Path) -> list[str]:
    """One rolling log-likelihood task per evaluated dataset (dynamo_<dataset>)."""
    return build_local_tasks(documents, workdir)


@register_eval_task(MC_TASK)
def math_mc_task(documents: dict[str, list[str]], workdir: Path) -> list[str]:
    """Multiple choice from the embedded math domain's test split, whatever the run evaluates."""
    from dynamo.config import SourceConfig, SourceKind
    from dynamo.data import load_documents

    return build_local_tasks({}, workdir, mc_source=load_documents(SourceConfig(kind=SourceKind.embedded,
                                                                                  path="math"), "test"))


def math_mc_docs(mc_source: list[str], seed: int = 0) -> list[dict]:
    """One {"prompt", "choices", "label"} record per question of the math documents."""
    pairs = [(m[1].strip(), m[2].strip()) for doc in mc_source for block in re.split(r"\n\s*\n", doc)
             if (m := _QA.match(block.strip()))]
    # dict keeps first-seen order: a set's order would change with PYTHONHASHSEED.
    answers = list(dict.fromkeys(a for _, a in pairs))
    rng = random.Random(seed)
    records = []
    for question, answer in pairs:
        choices = [answer] + distractors(answer, answers, rng)
        rng.shuffle(choices)
        records.append({"prompt": f"Question: {question}\nAnswer:", "choices": choices,
                        "label": choices.index(answer)})
    return records


def distractors(answer: str, pool: list[str], rng: random.Random, k: int = N_DISTRACTORS) -> list[str]:
    """k wrong answers: perturbed numbers for a numeric answer, else other questions' answers."""
    if _NUMBER.fullmatch(answer):
        return _numeric_distractors(answer, rng, k)
    others = [a for a in pool if a != answer]
    if len(others) < k:
        raise UserError(f"math MC task needs at least {k + 1} distinct non-numeric answers, got "
                        f"{len(others) + 1}: give more math documents")
    return rng.sample(others, k)


def _numeric_distractors(answer: str, rng: random.Random, k: int) -> list[str]:
    value = Decimal(answer)
    step = Decimal(1).scaleb(-len(answer.partition(".")[2]))  # keep the answer's decimals
    candidates = [value + 1, value - 1, value * Decimal("1.1"), value * Decimal("0.9"), -value,
                  _change_digit(answer, rng)]
    rng.shuffle(candidates)
    seen, out = {value}, []
    # Far offsets guarantee k distinct values when the small perturbations collide (e.g. answer 0).
    for c in candidates + [value + n * s for n in range(2, k + 3) for s in (1, -1)]:
        c = c.quantize(step) + 0  # "+ 0" turns -0 (e.g. -1 * 0.9 rounded) into 0
        if c not in seen:
            seen.add(c)
            out.append(str(c))
    return out[:k]


def _change_digit(answer: str, rng: random.Random) -> Decimal:
    positions = [i for i, ch in enumerate(answer) if ch.isdigit()]
    i = rng.choice(positions)
    leading = i == positions[0] and len(answer.split(".")[0].lstrip("-")) > 1
    digit = rng.choice([d for d in "0123456789"[leading:] if d != answer[i]])
    return Decimal(answer[:i] + digit + answer[i + 1:])


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _write_task(workdir: Path, name: str, **fields) -> None:
    config = {
        "task": name,
        "dataset_path": "json",
        # cache_dir keeps datasets' Arrow cache in workdir, whatever HF_HOME was when datasets was imported.
        "dataset_kwargs": {"data_files": {"test": str(workdir / "data" / f"{name}.jsonl")},
                           "cache_dir": str(workdir / "datasets_cache")},
        "test_split": "test",
        **fields,
        "metadata": {"version": 1.0},
    }
    (workdir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


@dataclass
class LmEvalResult:
    metrics: dict[str, dict[str, float]]
    # Multiple-choice tasks: {task: {"doc_id": [...], "acc": [0/1 per question], "acc_norm": [...]}}, by doc_id.
    per_question: dict[str, dict[str, list]] = field(default_factory=dict)


def run_lm_eval(model, tokenizer, tasks: list[str], include_path: Path | None, batch_size: int = 8,
                max_length: int | None = None, limit: int | float | None = None,
                device: str = "cpu") -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of `evaluate_tasks` (no per-question results)."""
    return evaluate_tasks(model, tokenizer, tasks, include_path, batch_size, max_length, limit, device,
                          per_question=False).metrics


def evaluate_tasks(model, tokenizer, tasks: list[str], include_path: Path | None, batch_size: int = 8,
                   max_length: int | None = None, limit: int | float | None = None, device: str = "cpu",
                   per_question: bool = True) -> LmEvalResult:
    """Run lm_eval.simple_evaluate on an in-memory HF model (moved to device) through HFLM.

    Tasks under include_path load offline with lm-eval's built-in tasks left out (fast); any other
    task is looked up among lm-eval's own and needs its dataset from the hub or the HF cache.
    Metrics are {task: {metric: value}} without lm-eval's ",none" suffix and without stderr entries;
    with per_question, lm-eval's per-sample log gives each question's acc / acc_norm.
    Raises UserError naming the task when it is unknown or its data cannot be loaded.
    """
    import lm_eval  # heavy (~3 s): only when evaluating
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ..devices import is_sharded
    from ..offload import offload_of

    lm_logger = logging.getLogger("lm_eval")
    old_level, was_training = lm_logger.level, model.training
    lm_logger.setLevel(logging.WARNING)
    try:
        manager = TaskManager(include_path=str(include_path), include_defaults=False) if include_path else None
        if manager is None or not set(tasks) <= set(manager.all_tasks):
            manager = TaskManager(include_path=str(include_path) if include_path else None)
        for name in tasks:
            if name not in manager.all_tasks:
                raise UserError(f"lm-eval task '{name}' not found: use an lm-eval task name "
                                f"or a task written by build_local_tasks into include_path ({include_path})")
        # Datasets are loaded here, task by task, so a failure names its task.
        loaded = [task for name in tasks for task in _load_task(manager, name)]
        # an offloaded model is placed already (.to() would load every layer), and so is one a device_map
        # sharded over several devices (.to() would gather every shard onto one)
        if offload_of(model) is None and not is_sharded(model):
            model = model.to(device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=loaded, task_manager=manager, limit=limit,
            bootstrap_iters=0,  # stderr is dropped anyway; perplexity stderr would bootstrap 100k times
            log_samples=per_question,
            # None leaves the caller's global random/numpy/torch RNG states alone (0-shot needs no seeds).
            random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    finally:
        lm_logger.setLevel(old_level)
        model.train(was_training)  # HFLM switches the model to eval mode
    metrics = {task: {key.removesuffix(",none"): float(value) for key, value in values.items()
                      if key.endswith(",none") and "_stderr" not in key}
               for task, values in out["results"].items()}
    return LmEvalResult(metrics, _per_question(out.get("samples") or {}))


def _per_question(samples: dict[str, list[dict]]) -> dict[str, dict[str, list]]:
    """Per-question 0/1 metrics of the tasks that have them (rolling tasks log (loglik, count) tuples)."""
    out = {}
    for task, rows in samples.items():
        rows = sorted(rows, key=lambda row: row["doc_id"])
        names = [m for m in ("acc", "acc_norm") if rows and all(isinstance(row.get(m), (int, float)) for row in rows)]
        if names:
            out[task] = {"doc_id": [int(row["doc_id"]) for row in rows],
                         **{m: [float(row[m]) for row in rows] for m in names}}
    return out


def _load_task(manager, name: str) -> list:
    """The Task or Group behind one task name (the Tasks of a tag), datasets loaded."""
    try:
        loaded = manager.load([name])
    except Exception as err:
        raise UserError(f"cannot load lm-eval task '{name}' ({type(err).__name__}: {(str(err).splitlines() or [''])[0]}): "
                        "its dataset must be in the HF cache (run once with hub access) or drop the task") from err
    item = loaded["groups"].get(name) or loaded["tasks"].get(name)
    return [item] if item is not None else list(loaded["tasks"].values())
