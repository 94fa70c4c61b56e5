"""The outside-client check: lm-eval's own command line on a dequantized export sees the harness's numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
MAX_LENGTH = 256


@pytest.mark.slow
def test_lm_eval_command_line_on_a_dequantized_export_matches_the_harness(tmp_path):
    """Embedded tiny-olmoe, RTN 3-bit experts, exported dequantized; a local rolling-loglikelihood task
    over three code documents: `lm_eval --model hf` in a subprocess that cannot import this project
    gives the in-process harness's metrics to 1e-4 relative."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynamo.config import SourceConfig
    from dynamo.data import load_documents
    from dynamo.eval.harness import build_local_tasks, run_lm_eval
    from dynamo.export.dequantized import NOTE_KEY, save_dequantized
    from dynamo.quant import QSpec, QuantPlan, apply_plan

    path = REPO / "assets" / "models" / "tiny-olmoe"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    apply_plan(model, QuantPlan(method="rtn", default=QSpec(3)))
    export = tmp_path / "export"
    save_dequantized(model, tokenizer, export, {"format": "dequantized", "quant": "rtn_3bit", "method": "rtn",
                                                 "avg_bits_experts": 3.15, "avg_bits_experts_codes_only": 3.0,
                                                 "switched_to": None, "dtype": "float32", "source_model": str(path),
                                                 "git_commit": None})
    config = json.loads((export / "config.json").read_text())
    assert "quantization_config" not in config and config[NOTE_KEY]["format"] == "dequantized"
    assert config["model_type"] == "olmoe" and "auto_map" not in config

    tasks = tmp_path / "tasks"
    docs = load_documents(SourceConfig(path="code"), "test")[:3]
    (task,) = build_local_tasks({"code": docs}, tasks)
    inside = run_lm_eval(model, tokenizer, [task], tasks, batch_size=1, max_length=MAX_LENGTH)[task]

    out = tmp_path / "lm_eval_out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cli = Path(sys.executable).with_name("lm_eval")
    proc = subprocess.run([str(cli), "--model", "hf",
                           "--model_args", f"pretrained={export},dtype=float32,max_length={MAX_LENGTH}",
                           "--tasks", task, "--include_path", str(tasks), "--batch_size", "1", "--device", "cpu",
                           "--output_path", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = out.rglob("results_*.json")
    outside = json.loads(result_file.read_text())["results"][task]
    for metric in METRICS:
        assert outside[f"{metric},none"] == pytest.approx(inside[metric], rel=1e-4), metric
