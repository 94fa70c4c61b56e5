"""Load a causal LM and its tokenizer from a model config (hub id or local directory)."""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    max_length: int


def is_packed(config) -> bool:
    """A checkpoint whose routed experts are packed by this project (quant.export=packed)."""
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return method == "dynamo"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"model.device={name} but no CUDA device is visible; use model.device=cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # CPUs have no fast half-precision matmul: evaluate the 16-bit checkpoint in fp32 there.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown model.dtype '{name}'; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


SHOWN_KEYS = 3  # tensors named per kind in the error line


def check_loading_info(info: dict, path: str) -> None:
    """Refuse a checkpoint whose tensors do not match its model: transformers fills a missing tensor
    with random values, drops an unexpected one and (asked to) re-initialises a mismatched one, then
    evaluates the result (a packed checkpoint missing one qweight tensor gave PPL 20.08 for 11.28)."""
    problems = []
    for kind in ("missing", "unexpected"):
        keys = sorted(info.get(f"{kind}_keys") or ())
        if keys:
            shown = ", ".join(keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")
            problems.append(f"{len(keys)} {kind} tensor(s) ({shown})")
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: str(m[0]))
    if mismatched:
        shown = ", ".join(f"{name} {list(ckpt)} in the file, {list(model)} expected"
                          for name, ckpt, model in mismatched[:SHOWN_KEYS])
        problems.append(f"{len(mismatched)} tensor(s) of the wrong shape ({shown}{', ...' if len(mismatched) > SHOWN_KEYS else ''})")
    if problems:
        raise UserError(f"model.path={path}: the weights do not match the model's config: {'; '.join(problems)}. "
                        "Nothing was evaluated; re-save or re-download the checkpoint (a packed one: re-export it)")


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()


def load_model(cfg: ModelConfig) -> LoadedModel:
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .packed.format import base_config, is_guarded, read_config_dict  # registers quant_method "dynamo"

    hf_logging.disable_progress_bar()  # one line per run, not one per weight shard

    path = str(Path(cfg.path).expanduser()) if _looks_local(cfg.path) else cfg.path
    if _looks_local(cfg.path) and not (Path(path) / "config.json").is_file():
        raise UserError(f"model.path={cfg.path}: no checkpoint there (config.json missing); "
                        "give a directory written by save_pretrained")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    common = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    kwargs = dict(dtype=dtype, **common)
    if cfg.device_map and device.type == "cuda" and not cfg.offload:  # offload places the layers itself
        kwargs["device_map"] = cfg.device_map
    elif device.type != "cpu" and not cfg.offload:  # straight onto the device, no whole copy in host RAM first
        kwargs["device_map"] = {"": device}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        # The config first: it is where a checkpoint that needs remote code says so.
        config_dict = read_config_dict(path, revision=cfg.revision)
        if is_guarded(config_dict):
            # written by quant.export=packed: the harness reads the format itself, never through remote code
            config = base_config(config_dict)
        else:
            config = AutoConfig.from_pretrained(path, **common)
        tokenizer = AutoTokenizer.from_pretrained(path, config=config, **common)
        # loading info + mismatches reported, not raised: check_loading_info refuses every kind in one line
        model, info = AutoModelForCausalLM.from_pretrained(path, config=config, output_loading_info=True,
                                                           ignore_mismatched_sizes=True, **kwargs)
    except pickle.UnpicklingError:  # torch.load(weights_only=True) refused a pickle that would run code
        raise UserError(f"model.path={cfg.path}: its .bin weights are a pickle that holds more than tensors (it "
                        "would run code when loaded) and was refused; use a safetensors checkpoint you "
                        "trust") from None
    except (OSError, ValueError, SafetensorError) as err:  # SafetensorError: a corrupt weights file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "trust_remote_code" in str(err):
            raise UserError(f"{cfg.path} ships its own modelling code; if you trust it, re-run with "
                            "model.trust_remote_code=true (and pin model.revision)") from None
        raise UserError(f"could not load model {cfg.path}: {first}. Offline, use an embedded model "
                        "(model=testbed-qwen-moe) or model=local model.path=<dir>") from None
    check_loading_info(info, cfg.path)
    if cfg.offload:
        from .offload import offload_layers

        state = offload_layers(model, device)
        log.info("model.offload: %.2f GiB of decoder layers stay on the CPU, one at a time on %s",
                 state.decoder_bytes() / 2**30, device)
    elif "device_map" not in kwargs:
        model.to(device)
    model.eval()
    max_length = cfg.max_length or getattr(model.config, "max_position_embeddings", None)
    if max_length is None:
        raise UserError(f"{cfg.path}: the model config has no max_position_embeddings; set model.max_length")
    log.info("loaded %s (%s, %s, %.1f M params)", cfg.path, model.__class__.__name__, dtype,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, dtype=dtype, max_length=int(max_length))
