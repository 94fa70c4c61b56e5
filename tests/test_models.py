"""Model loading: devices, dtypes, remote code only on request, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from dynamo.config import ModelConfig
from dynamo.errors import UserError
from dynamo.models import load_model, resolve_dtype, resolve_device


def test_auto_dtype_is_fp32_on_cpu_and_bf16_on_gpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(UserError, match="unknown model.dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device("cuda")


def test_loads_a_local_checkpoint(tiny_model_dir):
    loaded = load_model(ModelConfig(name="tiny", path=str(tiny_model_dir)))
    assert loaded.max_length == 128 and loaded.dtype == torch.float32 and not loaded.model.training
    assert load_model(ModelConfig(name="tiny", path=str(tiny_model_dir), max_length=64)).max_length == 64


def test_remote_code_is_never_run_unless_the_config_says_so(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek", "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"}}))
    (tmp_path / "configuration_deepseek.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UserError, match="model.trust_remote_code=true"):
        load_model(ModelConfig(name="ds", path=str(tmp_path)))


def test_missing_checkpoint_and_offline_hub_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="config.json missing"):
        load_model(ModelConfig(name="x", path=str(tmp_path)))
    with pytest.raises(UserError, match="could not load model allenai/OLMoE-1B-7B-0924") as err:
        load_model(ModelConfig(name="olmoe", path="allenai/OLMoE-1B-7B-0924"))
    assert "\n" not in str(err.value)
