"""Traps a real model on a GPU would meet and no embedded run can hit (issue 27): a big vocabulary's KL
reference filling the disk, a sharded device_map gathered onto one GPU, a whole host copy before the GPU."""

from __future__ import annotations

import shutil
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch

from dynamo.errors import UserError
from dynamo.eval import fidelity
from dynamo.eval.fidelity import (DEFAULT_TOPK, FULL_VOCAB_MAX, ReferenceLogprobs, check_reference_disk,
                                  default_topk, reference_nbytes)

QWEN_VOCAB = 151936


# --- KL on big vocabularies --------------------------------------------------------------------------------


def test_topk_is_the_default_above_the_limit():
    assert default_topk(None, 8192) is None  # the embedded models: full vector, records unchanged
    assert default_topk(None, FULL_VOCAB_MAX) is None
    assert default_topk(None, QWEN_VOCAB) == DEFAULT_TOPK
    assert default_topk(7, QWEN_VOCAB) == 7 and default_topk(7, 8192) == 7  # an explicit k stays


@pytest.mark.parametrize("topk", [None, 5])
def test_the_estimate_is_what_the_reference_writes(tmp_path, topk):
    vocab, shapes = 50, {"a": (3, 9), "b": (2, 9)}
    with ReferenceLogprobs(topk, root=tmp_path) as ref:
        for name, (n, seqlen) in shapes.items():
            record = ref.recorder(name, torch.zeros(n, seqlen, dtype=torch.long), vocab)
            record(0, torch.randn(n, seqlen - 1, vocab).log_softmax(-1))
        estimate = reference_nbytes(shapes, vocab, topk)
        files = len(list(ref.dir.glob("*.npy")))
        assert estimate <= ref.nbytes <= estimate + 256 * files  # .npy headers only


def test_a_152k_vocabulary_defaults_to_megabytes_not_gigabytes():
    windows = {"code": (16, 512)}
    full = reference_nbytes(windows, QWEN_VOCAB, None)
    assert full > 2.3e9  # the 2.37 GB for 16 windows
    assert reference_nbytes(windows, QWEN_VOCAB, default_topk(None, QWEN_VOCAB)) < 0.01 * full


def test_refusal_names_the_setting_and_the_bytes(monkeypatch, tmp_path):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fidelity.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(UserError) as err:
        check_reference_disk(2_370_000_000, tmp_path, None, QWEN_VOCAB)
    message = str(err.value)
    assert "eval.kl_topk" in message and "2370000000 bytes" in message and "\n" not in message
    check_reference_disk(10**5, tmp_path, None, QWEN_VOCAB)  # fits: no error


@pytest.fixture(scope="module")
def big_vocab_model_dir(tmp_path_factory, tokenizer):
    """A tiny random OLMoE with Qwen's 151,936-token vocabulary (the tokenizer's 8k ids are a subset)."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_olmoe_config

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("big-vocab-olmoe")
    AutoModelForCausalLM.from_config(tiny_olmoe_config(QWEN_VOCAB, hidden_size=16, intermediate_size=16)
                                     ).to(torch.float16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow  # a 152k-vocabulary checkpoint and a run; the refusal itself is checked fast above
def test_run_refuses_before_the_fp16_pass_when_the_disk_is_full(cli, tmp_path, monkeypatch, big_vocab_model_dir):
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    monkeypatch.setattr(fidelity.shutil, "disk_usage",
                        lambda path: usage(real(path).total, real(path).total - 1000, 1000))
    status, _, err = cli("experiment=smoke", "logger=none", f"results_dir={tmp_path}", "model=local",
                         f"model.path={big_vocab_model_dir}", "quant=rtn_3bit", "eval=ppl", "eval.datasets=[code]",
                         "eval.reference=true", "eval.max_windows=2", "eval.seqlen=32")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert status != 0 and len(lines) == 1, err[-2000:]
    assert "eval.kl_topk" in lines[0] and "bytes" in lines[0] and f"top {DEFAULT_TOPK} of {QWEN_VOCAB}" in lines[0]


# --- a sharded device_map ----------------------------------------------------------------------------------


class _Sharded(torch.nn.Linear):
    hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": "cuda:1"}

    def to(self, *args, **kwargs):  # what evaluate_tasks must not do to a sharded model
        raise AssertionError("a sharded model was moved with .to()")


def test_sharded_placement_is_read_from_the_device_map():
    from dynamo.devices import is_sharded, mapped_devices

    model = _Sharded(2, 2)
    assert mapped_devices(model) == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert is_sharded(model)
    single = torch.nn.Linear(2, 2)
    single.hf_device_map = {"": torch.device("cuda", 0)}
    assert not is_sharded(single) and not is_sharded(torch.nn.Linear(2, 2))


def test_peak_memory_sums_every_gpu_of_the_map(monkeypatch):
    from dynamo import devices

    monkeypatch.setattr(devices.torch.cuda, "max_memory_allocated", lambda d: 1000 * (d.index + 1))
    assert devices.peak_gpu_memory_bytes(_Sharded(2, 2), torch.device("cuda", 0)) == 1000 + 2000
    assert devices.peak_gpu_memory_bytes(torch.nn.Linear(2, 2), torch.device("cuda", 1)) == 2000


def test_lm_eval_leaves_a_sharded_model_where_it_is(monkeypatch):
    """evaluate_tasks hands a sharded model to HFLM as placed (no .to(device))."""
    import lm_eval
    import lm_eval.models.huggingface as hf

    from dynamo.eval import harness

    seen = {}

    class FakeLM:
        def __init__(self, pretrained, **kwargs):
            seen["model"] = pretrained

    monkeypatch.setattr(hf, "HFLM", FakeLM)
    monkeypatch.setattr(harness, "_load_task", lambda manager, name: [])
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: {"results": {}})
    manager = SimpleNamespace(all_tasks={"t"})
    monkeypatch.setattr("lm_eval.tasks.TaskManager", lambda **kw: manager)
    model = _Sharded(2, 2)
    harness.evaluate_tasks(model, None, ["t"], None, device="cuda:0")
    assert seen["model"] is model


# --- loading straight to the device -------------------------------------------------------------------------


def test_a_gpu_load_places_weights_on_the_device_directly(monkeypatch, tiny_model_dir):
    """device=cuda without a device_map loads with device_map={'': device}: no whole model in host RAM first."""
    from transformers import AutoModelForCausalLM

    from dynamo import models
    from dynamo.config import ModelConfig

    calls = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        calls.update(kwargs)
        return real(path, **{k: v for k, v in kwargs.items() if k != "device_map"})

    monkeypatch.setattr(models, "resolve_device", lambda name: torch.device("cuda", 0))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: pytest.fail("model.to() after loading"))
    models.load_model(ModelConfig(name="t", path=str(tiny_model_dir), device="cuda", dtype="float32"))
    assert calls["device_map"] == {"": torch.device("cuda", 0)}

    calls.clear()  # an explicit device_map is passed through as given
    models.load_model(ModelConfig(name="t", path=str(tiny_model_dir), device="cuda", dtype="float32",
                                  device_map="auto"))
    assert calls["device_map"] == "auto"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_a_model_split_over_cpu_and_gpu_stays_split(monkeypatch, tiny_model_dir):
    """accelerate places half the model on the GPU, half on the CPU: lm-eval's path leaves it so, and the peak
    memory figure reads the GPU it uses (scripts/device_checks.sh runs this)."""
    import sys
    import types

    from transformers import AutoModelForCausalLM

    from dynamo import devices
    from dynamo.eval import harness

    pytest.importorskip("accelerate")
    # lm-eval itself need not be installed on the GPU machine: the placement decision is the harness's
    fake = {name: types.ModuleType(name) for name in ("lm_eval", "lm_eval.models", "lm_eval.models.huggingface",
                                                      "lm_eval.tasks")}
    fake["lm_eval.models.huggingface"].HFLM = None
    fake["lm_eval.tasks"].TaskManager = None
    fake["lm_eval"].simple_evaluate = None
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    lm_eval, hf = fake["lm_eval"], fake["lm_eval.models.huggingface"]

    placement = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": 0, "model.norm": 0,
                 "model.rotary_emb": 0, "lm_head": 0}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, device_map=placement)
    assert devices.is_sharded(model)
    before = {n: p.device for n, p in model.named_parameters()}
    monkeypatch.setattr(hf, "HFLM", lambda pretrained, **kw: pretrained)
    monkeypatch.setattr(harness, "_load_task", lambda manager, name: [])
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: {"results": {}})
    monkeypatch.setattr(fake["lm_eval.tasks"], "TaskManager", lambda **kw: SimpleNamespace(all_tasks={"t"}))
    harness.evaluate_tasks(model, None, ["t"], None, device="cuda")
    assert {n: p.device for n, p in model.named_parameters()} == before
    assert devices.peak_gpu_memory_bytes(model, torch.device("cuda")) > 0
