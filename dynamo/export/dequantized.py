"""quant.export=dequantized: a standard transformers checkpoint holding the quantized values.

After evaluation the model's routed experts hold their fake-quantized weights (codes times scales,
at the model's dtype), which is exactly what every metric of the run measured. Saved as they are,
they make a checkpoint any tool loads (lm-eval, vLLM, a notebook): no `quantization_config`, so no
memory saving, and config.json["dynamo_export"] plus a README model card say what it holds. A DQS
run can export the model as switched to one dataset (quant.export_dataset; the pipeline switches
before calling `write`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import AnalysisConfig, ModelConfig, QuantConfig
from ..errors import UserError
from ..records import git_state
from ..registry import QUANTIZERS
from .files import atomic_dir, carry_training_record, nbytes, training_record

EXPORT_DIR = "dequantized_model"
NOTE_KEY = "dynamo_export"


def check(quant: QuantConfig, model_cfg: ModelConfig, analysis: AnalysisConfig, model) -> None:
    if not QUANTIZERS.get(quant.method).plan:
        raise UserError(f"quant.export=dequantized writes the fake-quantized weights of an rtn or gptq run, not "
                        f"quant.method={quant.method}")


def note(quant: QuantConfig, model_cfg: ModelConfig, stage, dtype: str) -> dict:
    bits = stage.quantization["bits"]
    return {"format": "dequantized", "harness": "DynaMo harness (arXiv 2503.21135)",
            "source_model": model_cfg.path, "quant": quant.name, "method": quant.method,
            "avg_bits_experts": bits["experts"], "avg_bits_experts_codes_only": bits["experts_codes_only"],
            "switched_to": quant.export_dataset, "dtype": dtype,
            "memory": f"no saving: every weight is stored at {dtype}", "git_commit": git_state()["commit"]}


def write(loaded, stage, quant: QuantConfig, model_cfg: ModelConfig, run_dir: Path) -> dict:
    model = loaded.model
    dtype = str(loaded.dtype).removeprefix("torch.")
    info = note(quant, model_cfg, stage, dtype)
    if getattr(model.config, "quantization_config", None) is not None:
        raise UserError("quant.export=dequantized: the model carries a quantization_config; nothing to dequantize")
    target = run_dir / EXPORT_DIR
    save_dequantized(model, loaded.tokenizer, target, info, training_record(model_cfg))
    return {"format": "dequantized", "path": EXPORT_DIR, "switched_to": info["switched_to"], "dtype": dtype,
            "checkpoint_nbytes": nbytes(target)}


def save_dequantized(model, tokenizer, target: Path, info: dict, training: Path | None = None) -> None:
    """save_pretrained of a fake-quantized model with its note in config.json and a model card, all or
    nothing; `training`: the source's training record, carried along (export.files.training_record)."""
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        carry_training_record(training, tmp)
        config = json.loads((tmp / "config.json").read_text())
        config[NOTE_KEY] = info
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(info, config.get("model_type")))


def model_card(info: dict, model_type: str | None) -> str:
    switched = (f"the BQ model switched by DQS to the dataset `{info['switched_to']}` (its calib split)"
                if info["switched_to"] else "the baseline quantization (BQ, no DQS switch)")
    return f"""---
library_name: transformers
tags: [dynamo, quantized, fake-quant, moe]
---

# {info['source_model']}, quantized by DynaMo ({info['quant']}), stored dequantized

A standard `{model_type}` checkpoint: the routed experts hold exactly the quantized values
({info['method']}, {info['avg_bits_experts']:.3f} average bits per expert weight with scales and zeros,
{info['avg_bits_experts_codes_only']:.3f} codes only), dequantized to {info['dtype']}. It is {switched}.

**No memory saving**: there is no `quantization_config`; every weight is stored and run at
{info['dtype']}. It exists so that any tool sees the quantized model's numbers: load it with
`AutoModelForCausalLM.from_pretrained("<this folder>")`, no remote code. For the real low-bit
checkpoint, export the run with `quant.export=packed` (loads with the DynaMo harness).

    lm_eval --model hf --model_args pretrained=<this folder>,dtype={info['dtype']} --tasks <tasks>

config.json["{NOTE_KEY}"] records how it was made (harness commit {info['git_commit']}).
"""
