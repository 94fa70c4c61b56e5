"""Checks a run makes before any model work: value ranges, every data file it will read, the checkpoint.

Each failure is a UserError (run.py prints it as one `error:` line and exits 2). The pipeline
calls `validate_run` first, so a bad value or file fails in seconds, not after the offline stage.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .data import known_datasets, load_documents, sources_of
from .errors import UserError
from .registry import QUANTIZERS, check_names


def _at_least(name: str, value, low: int) -> None:
    if value is not None and value < low:
        raise UserError(f"{name}={value} must be >= {low}")


def check_ranges(cfg: DictConfig) -> None:
    """Values the schema's types allow but the run cannot use (they used to fail deep inside, or silently)."""
    for node in ("eval", "calib", "analysis"):
        _at_least(f"{node}.seqlen", cfg[node].seqlen, 2)  # a window predicts seqlen - 1 tokens
        _at_least(f"{node}.batch_size", cfg[node].batch_size, 1)
    for node in ("calib", "analysis"):
        if cfg[node].split == "test":
            raise UserError(f"{node}.split=test would calibrate on the evaluation data; use {node}.split=calib")
    _at_least("eval.max_windows", cfg.eval.max_windows, 1)
    _at_least("calib.windows", cfg.calib.windows, 1)
    _at_least("analysis.windows", cfg.analysis.windows, 1)
    _at_least("eval.stream_windows", cfg.eval.stream_windows, 1)
    _at_least("eval.stream_batch_size", cfg.eval.stream_batch_size, 1)
    frac = cfg.analysis.dynamic_channel_frac
    if not 0 < frac <= 1:
        raise UserError(f"analysis.dynamic_channel_frac={frac} must be in (0, 1] (a share of each expert's channels)")
    if QUANTIZERS.get(cfg.quant.method).plan and cfg.quant.plan is None:
        from .quant.allocation import rule_of

        rule = rule_of(cfg.quant.allocation)
        if rule.check is not None:  # e.g. target_bits inside the widths the rule chooses from
            rule.check(cfg.quant.allocation)


def check_quant_options(cfg: DictConfig) -> None:
    """The quantizer's own options (they used to fail after the FP16 pass, the analysis or GPTQ, or
    not at all: damp <= 0 silently turned every GPTQ matrix into RTN)."""
    from .quant.spec import SUPPORTED_BITS

    quant = cfg.quant
    quantizer = QUANTIZERS.get(quant.method)
    if quantizer.name == "none":
        return
    if quantizer.plan:
        if quant.plan:
            check_plan_file(quant)
        else:
            widths = [b for b in SUPPORTED_BITS if b != 16]
            if quant.bits not in SUPPORTED_BITS:
                raise UserError(f"quant.bits={quant.bits} is not a supported width; choose one of "
                                f"{', '.join(map(str, widths))} (or 16 to keep experts in 16 bits)")
            if quant.shared_expert_bits is not None and quant.shared_expert_bits not in SUPPORTED_BITS:
                raise UserError(f"quant.shared_expert_bits={quant.shared_expert_bits} is not a supported width; "
                                f"choose one of {', '.join(map(str, SUPPORTED_BITS))}")
        if quant.group_size != -1 and quant.group_size <= 0:
            raise UserError(f"quant.group_size={quant.group_size} must be a positive number of input columns, "
                            "or -1 for one group per row")
    if quantizer.calibration and not quant.damp > 0:
        raise UserError(f"quant.damp={quant.damp} must be > 0 (GPTQ adds damp x the mean Hessian diagonal; "
                        "without it GPTQ falls back to RTN); the usual value is 0.01")
    if quantizer.name == "bnb":
        from .quant.bnb import FORMATS

        if quant.bnb_format not in FORMATS:
            raise UserError(f"unknown quant.bnb_format '{quant.bnb_format}'; choose one of {', '.join(FORMATS)}")
    if quant.switching.enabled and quant.switching.slot_bits not in (8, 16):
        raise UserError(f"quant.switching.slot_bits={quant.switching.slot_bits}: restored rows/columns are RTN-8 "
                        "(8) or FP16 (16); choose 8 or 16")


def check_plan_file(quant) -> None:
    """A quant.plan file read and checked now (its layers are checked against the model once loaded)."""
    from .quant.plan import QuantPlan

    plan = QuantPlan.load(Path(quant.plan).expanduser())
    if plan.method != quant.method:
        raise UserError(f"{quant.plan} is a {plan.method} plan but quant.method={quant.method}; "
                        f"set quant.method={plan.method} or use another plan")


def check_logger(cfg: DictConfig) -> None:
    """logger=wandb needs the package: say so now, not after the run (a tracker failure after the record
    is written is only a warning, so this is the last chance to fail on it)."""
    import importlib.util

    if cfg.logger.backend.value == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UserError("logger=wandb needs the wandb package (pip install wandb), or use logger=none")


def check_device(name: str) -> None:
    """model.device must name a device that holds real weights (meta has none: a traceback deep inside)."""
    import torch

    try:
        device = torch.device(name) if name != "auto" else None
    except RuntimeError:
        raise UserError(f"model.device={name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device is not None and device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UserError(f"model.device={name}: a {device.type} device holds no weights to evaluate; "
                        "use auto, cpu, cuda or cuda:N")


def check_not_test_file(cfg: DictConfig) -> None:
    """A calibration file that is the test file calibrates on the evaluation data (as calib.split=test
    would): dataset.calib_path equal to dataset.path, or a local source's calib_path equal to its path."""
    from .config import SourceKind

    for name, source in sources_of(cfg.dataset).items():
        if source.kind != SourceKind.local or not source.calib_path or not source.path:
            continue
        if Path(str(source.path)).expanduser().resolve() == Path(source.calib_path).expanduser().resolve():
            raise UserError(f"dataset.calib_path is the test file itself ({source.path}, source '{name}'); "
                            "calibrating on the evaluation data inflates every quantized score. Give a separate "
                            "calibration file, or leave calib_path unset to hold out the file's leading documents")


def check_model_config(cfg: DictConfig) -> None:
    """A local checkpoint's config.json, read without its weights: a model the run cannot quantize or
    calibrate (dense, or a family without an adapter; already packed) is refused before the FP16 pass."""
    from .adapters import adapter_for_type
    from .packed.format import KEY, is_guarded

    path = cfg.model.path
    folder = Path(path).expanduser() if path else None
    if folder is None or not (folder / "config.json").is_file():
        return  # a hub model: its config is read with the model (offline, no network here)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as err:
        raise UserError(f"model.path={path}: config.json is not valid JSON ({err}); re-save the checkpoint") from None
    if not isinstance(config, dict):
        raise UserError(f"model.path={path}: config.json is not a JSON object; re-save the checkpoint")
    quantizing = QUANTIZERS.get(cfg.quant.method).name != "none"
    quant_cfg = config.get("quantization_config")
    packed = is_guarded(config) or (isinstance(quant_cfg, dict) and quant_cfg.get("quant_method") == "dynamo")
    if packed and quantizing:
        raise UserError(f"{path} is already quantized (a packed DynaMo checkpoint); evaluate it with quant=fp16")
    if not (quantizing or cfg.calib.enabled):
        return
    model_type = config.get(KEY, {}).get("base_model_type") if is_guarded(config) else config.get("model_type")
    adapter_for_type(model_type)  # dense or unknown families: one line naming the supported ones


def calibration_sources(cfg: DictConfig, evaluated: list[str]) -> list[str]:
    """The sources whose calib split the run reads: calibration, DynaMo's analysis, DQS's switch profiles."""
    from .analysis import analysis_datasets
    from .quant.stage import needs_analysis

    known = known_datasets(cfg.dataset)
    names: list[str] = []
    quantizer = QUANTIZERS.get(cfg.quant.method)
    quantizing = quantizer.name != "none"
    if cfg.calib.enabled or quantizer.plan:
        names += list(cfg.calib.datasets or known)
    if quantizing and needs_analysis(cfg.quant):
        names += analysis_datasets(cfg.analysis, known)
        if cfg.quant.switching.enabled:
            names += evaluated
    return list(dict.fromkeys(names))


def check_calibration_data(cfg: DictConfig, sources: dict, evaluated: list[str]) -> None:
    """Read every calib split the run will use now, so a bad calibration file fails at start-up
    (the evaluated test splits are read by the pipeline right after, also before the model)."""
    for name in calibration_sources(cfg, evaluated):
        if name in sources:  # an unknown name is refused by its stage, with the list of choices
            load_documents(sources[name], "calib")


def check_checkpoint(path: str) -> None:
    """A local checkpoint's safetensors files must be complete: each header's tensors end within the file."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        try:
            with open(file, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(f.read(header_len))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (struct.error, ValueError, KeyError, TypeError, IndexError) as err:
            raise UserError(f"model.path={path}: {file.name} is not a valid safetensors file ({err}); "
                            "re-download or re-save the checkpoint") from None
        if 8 + header_len + end > size:
            raise UserError(f"model.path={path}: {file.name} is truncated ({size} bytes, its header needs "
                            f"{8 + header_len + end}); re-download or re-save the checkpoint")


def check_required(cfg: DictConfig) -> None:
    """Every value set, and every registry name known (after importing cfg.plugins)."""
    check_names(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"missing required value(s): {', '.join(missing)}; set them on the command line, "
                        f"e.g. {missing[0]}=...")


def validate_run(cfg: DictConfig, evaluated: dict) -> None:
    """Everything that can be checked before the model is loaded (`evaluated`: the sources to evaluate)."""
    check_required(cfg)
    check_ranges(cfg)
    check_logger(cfg)
    check_quant_options(cfg)
    check_device(cfg.model.device)
    check_not_test_file(cfg)
    check_calibration_data(cfg, sources_of(cfg.dataset), list(evaluated))
    if cfg.model.path and (cfg.model.path.startswith(("/", ".", "~")) or Path(cfg.model.path).expanduser().exists()):
        check_checkpoint(cfg.model.path)
        check_model_config(cfg)
