"""dynamo.eval.harness: local lm-eval tasks built and run offline on a tiny random OLMoE."""

import json
import math
import random
import re
import socket
from decimal import Decimal
from pathlib import Path

import pytest
import torch
import transformers

from dynamo.errors import UserError
from dynamo.eval.harness import MC_TASK, build_local_tasks, distractors, evaluate_tasks, math_mc_docs, run_lm_eval

ROOT = Path(__file__).resolve().parents[2]
MATH = """Question: What is 2 + 2?
Answer: 4

Question: Let x = 0.5 - 0.5. What is x?
Answer: 0

Question: Calculate -3.25*2.
Answer: -6.50

Question: Solve t**2 - 1 = 0.
Answer: -1, 1

Question: Is 7 prime?
Answer: True

Question: Simplify a*a.
Answer: a**2
"""
OTHER_DOC = "Question: Is 8 prime?\nAnswer: False\n\nQuestion: Expand (b + 1)**2.\nAnswer: b**2 + 2*b + 1\n"
DOCS = ["Hello world, this is a test.\nSecond line {{ not jinja }} here.", "def f(x):\n    return x + 1\n" * 40]


@pytest.fixture(autouse=True)
def _hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(ROOT / "assets" / "tokenizer")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = transformers.OlmoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_experts=4,
        num_experts_per_tok=2, intermediate_size=32, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return transformers.AutoModelForCausalLM.from_config(config)


def test_mc_choices_hold_true_answer_once_among_distinct_values():
    records = math_mc_docs([MATH, OTHER_DOC], seed=0)
    assert len(records) == 8
    for record in records:
        choices, answer = record["choices"], record["choices"][record["label"]]
        assert len(choices) == 4 and len(set(choices)) == 4
        assert record["prompt"].startswith("Question: ") and record["prompt"].endswith("\nAnswer:")
        if re.fullmatch(r"-?\d+(\.\d+)?", answer):
            assert len({Decimal(c) for c in choices}) == 4  # distinct as numbers, not only as strings
    assert len({r["label"] for r in records}) > 1  # choices are shuffled
    answers = [r["choices"][r["label"]] for r in records]
    assert answers == ["4", "0", "-6.50", "-1, 1", "True", "a**2", "False", "b**2 + 2*b + 1"]


def test_numeric_distractors_keep_format_and_avoid_collisions():
    for answer in ["0", "1", "-1", "7", "10", "-6.50", "0.0", "123456"]:
        for seed in range(20):
            wrong = distractors(answer, [], random.Random(seed))
            values = {Decimal(w) for w in wrong}
            assert len(values) == 3 and Decimal(answer) not in values, (answer, wrong)
            decimals = len(answer.partition(".")[2])
            assert all(len(w.partition(".")[2]) == decimals for w in wrong), (answer, wrong)
            assert not any(w.startswith("-0") and Decimal(w) == 0 for w in wrong)


def test_text_distractors_come_from_other_answers():
    pool = ["True", "False", "a**2", "-1, 1", "x + 1"]
    wrong = distractors("True", pool, random.Random(0))
    assert len(set(wrong)) == 3 and set(wrong) <= set(pool) - {"True"}
    with pytest.raises(UserError):
        distractors("True", ["True", "False"], random.Random(0))


def test_mc_is_deterministic_for_a_seed():
    assert math_mc_docs([MATH], seed=3) == math_mc_docs([MATH], seed=3)
    assert any(math_mc_docs([MATH], seed=s) != math_mc_docs([MATH], seed=3) for s in range(3))


def test_build_writes_tasks(tmp_path):
    names = build_local_tasks({"code": DOCS, "math": [MATH]}, tmp_path, mc_source=[MATH])
    assert names == ["dynamo_code", "dynamo_math", MC_TASK]
    assert sorted(p.name for p in tmp_path.glob("*.yaml")) == sorted(f"{n}.yaml" for n in names)
    rows = [json.loads(line) for line in (tmp_path / "data" / "dynamo_code.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == DOCS


def test_rolling_metrics_match_a_uniform_model(model, tokenizer, tmp_path, monkeypatch):
    """A zero lm_head predicts every token with probability 1/V: bits/byte is known exactly."""
    uniform = type(model)(model.config)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
    names = build_local_tasks({"t": DOCS}, tmp_path / "tasks")
    connections = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: connections.append(a) or [])
    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: connections.append(addr))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")

    metrics = run_lm_eval(uniform, tokenizer, names, tmp_path / "tasks", batch_size=2)["dynamo_t"]

    assert connections == []
    assert list((tmp_path / "cwd").iterdir()) == []
    assert set(metrics) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert all(math.isfinite(v) and v > 0 for v in metrics.values())
    assert metrics["bits_per_byte"] == pytest.approx(math.log2(metrics["byte_perplexity"]), rel=1e-9)
    n_tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in DOCS)
    n_bytes = sum(len(d.encode()) for d in DOCS)
    assert metrics["bits_per_byte"] == pytest.approx(n_tokens * math.log2(model.config.vocab_size) / n_bytes,
                                                     rel=1e-5)


def test_rolling_and_mc_run_together(model, tokenizer, tmp_path):
    names = build_local_tasks({"code": DOCS}, tmp_path, mc_source=[MATH, OTHER_DOC])
    model.train()
    out = evaluate_tasks(model, tokenizer, names, tmp_path, limit=5)
    results = out.metrics
    assert model.training  # the caller's mode survives HFLM's model.eval()
    assert set(results) == {"dynamo_code", MC_TASK}
    assert set(results[MC_TASK]) == {"acc", "acc_norm"}
    assert all(0.0 <= v <= 1.0 for v in results[MC_TASK].values())
    # Each question's correctness, in doc order, averaging to lm-eval's accuracy; none for rolling tasks.
    per_question = out.per_question
    assert set(per_question) == {MC_TASK} and per_question[MC_TASK]["doc_id"] == [0, 1, 2, 3, 4]
    for metric in ("acc", "acc_norm"):
        assert set(per_question[MC_TASK][metric]) <= {0.0, 1.0}
        assert sum(per_question[MC_TASK][metric]) / 5 == pytest.approx(results[MC_TASK][metric])
    code = results["dynamo_code"]
    assert code["bits_per_byte"] == pytest.approx(math.log2(code["byte_perplexity"]), rel=1e-9)


def test_unknown_task_raises_user_error_without_indexing_lm_evals_own_tasks(model, tokenizer, tmp_path, monkeypatch):
    """The lookup below, with lm-eval's thousands of built-in tasks left out of the index (indexing them
    takes tens of seconds): the name is missing from both indexes the harness builds, and the error says so."""
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        lambda include_path=None, include_defaults=True: real(include_path=include_path,
                                                                                include_defaults=False))
    build_local_tasks({"code": DOCS}, tmp_path)
    with pytest.raises(UserError, match="lm-eval task 'no_such_task_xyz' not found") as err:
        run_lm_eval(model, tokenizer, ["dynamo_code", "no_such_task_xyz"], tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_unknown_task_raises_user_error(model, tokenizer, tmp_path):
    build_local_tasks({"code": DOCS}, tmp_path)
    with pytest.raises(UserError, match="no_such_task_xyz") as err:
        run_lm_eval(model, tokenizer, ["dynamo_code", "no_such_task_xyz"], tmp_path)
    assert "\n" not in str(err.value)
