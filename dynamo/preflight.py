"""What run.py checks on the command line before Hydra starts, and the run folder it claims.

Hydra reports a schema error (misspelt key, wrong type, unknown enum value) in several lines,
suggests `+key=value` (which appends a key the code never reads) and exits 1. Here the same
overrides are composed first with Hydra's compose API, every job of a sweep included, and any
failure becomes one UserError line that names the allowed keys or values. Appended keys
(`+quant.x=...`) that the schema does not know are refused too.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import CONF_DIR, SCHEMAS
from .errors import UserError
from .registry import check_names
from .rundir import check_folder_names, check_no_record, check_writable, claim, model_label

MAX_COMBINATIONS = 64  # sweep jobs composed one by one; beyond this, each swept value is composed once
# Hydra flags that print or inspect instead of running: run.py passes them through untouched.
RUN_FLAGS = {"-m", "--multirun"}
GROUPS = (*SCHEMAS, "experiment", "local")


@dataclasses.dataclass
class Prepared:
    """The command line Hydra gets, and the folder this process claimed for it (None: not ours)."""

    argv: list[str]
    claimed: Path | None
    multirun: bool
    sweep_dir: Path | None = None   # where a sweep's job folders go (claimed, or the user's hydra.sweep.dir)


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def _full_key(err: BaseException) -> str | None:
    match = re.search(r"full_key: (\S+)", str(err))
    return match.group(1) if match else None


def _fields_at(cfg: DictConfig, key: str) -> tuple[str, list[str]] | None:
    """(the deepest existing parent of `key`, its keys) in a composed config."""
    parts = key.split(".")
    node, path = cfg, []
    for part in parts[:-1]:
        child = node.get(part) if isinstance(node, DictConfig) and part in node else None
        if not isinstance(child, DictConfig):
            break
        node, path = child, [*path, part]
    if not isinstance(node, DictConfig):
        return None
    return ".".join(path) or "the config", sorted(str(k) for k in node.keys() if str(k) != "hydra")


def unknown_key_message(key: str, reference: DictConfig) -> str:
    where = _fields_at(reference, key)
    if where is None:
        return f"unknown key '{key}'; see dynamo/config.py for the keys each group has"
    parent, keys = where
    if parent.rsplit(".", 1)[-1] in ("params", "export_params") and parent == key.rsplit(".", 1)[0]:
        # an entry's own settings block (dynamo.registry.parse_params): its keys are the entry's, not the schema's
        return (f"unknown key '{key}'; {parent} holds the chosen entry's own settings, which a preset may leave "
                f"out: add one with +{key}=... (checked against the parameters the entry declares)")
    return f"unknown key '{key}'; {parent} has: {', '.join(keys)}"


def explain(err: BaseException, override_text: str, reference: DictConfig) -> str:
    """One line for a composition failure, never suggesting `+key` (an appended key is ignored)."""
    cause = err.__cause__ if err.__cause__ is not None else err
    message = str(err)
    if "Ambiguous value" in message:
        return (f"{override_text}: a comma-separated value is a sweep; add -m to run each value "
                "(python run.py -m ...), or write a list as key=[a,b]")
    if "An item is already at" in message:
        key = re.search(r"already at '([^']+)'", message).group(1)
        return f"{key} already exists; set it without '+': {key}=..."
    full_key = _full_key(cause)
    if full_key and ("not in" in str(cause) or "Could not override" in message):
        return unknown_key_message(full_key, reference)
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if full_key:
        return f"{full_key}: {first}"
    return f"{override_text}: {first}" if override_text else first


def _schema_fields(cfg: DictConfig, parent: str) -> list[str] | None:
    """The dataclass fields of a structured node, or None for a plain dict (e.g. dataset.sources)."""
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return None
    typ = OmegaConf.get_type(node)
    return [f.name for f in dataclasses.fields(typ)] if dataclasses.is_dataclass(typ) else None


def check_appended_keys(overrides, cfg: DictConfig, reference: DictConfig) -> None:
    """`+quant.bitz=3` appends a key no code reads: refuse keys that the schema does not declare."""
    for o in overrides:
        if not o.is_add() or o.key_or_group in GROUPS or "/" in o.key_or_group:
            continue  # `+experiment=smoke` adds a config group option, which Hydra checks itself
        parent, _, leaf = o.key_or_group.rpartition(".")
        fields = _schema_fields(cfg, parent)
        if fields is not None and leaf not in fields:
            raise UserError(unknown_key_message(o.key_or_group, reference))


def _jobs(overrides) -> list[list[str]]:
    """The override lists of a sweep's jobs (all of them, or each swept value once if there are many)."""
    fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
    swept = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
             for o in overrides if o.is_sweep_override()]
    if not swept:
        return [fixed]
    combinations = 1
    for values in swept:
        combinations *= len(values)
    if combinations <= MAX_COMBINATIONS:
        return [fixed + list(job) for job in itertools.product(*swept)]
    firsts = [values[0] for values in swept]
    return [fixed + firsts[:i] + [value] + firsts[i + 1:] for i, values in enumerate(swept) for value in values]


def check_interpolations(cfg: DictConfig) -> None:
    """Resolve every `${...}` of the run's config now: a bad one (eval.seqlen='${nope}') used to be a
    traceback from the first code that read it. A `???` left to fill is check_required's business."""
    from omegaconf.errors import InterpolationResolutionError, InterpolationToMissingValueError

    for key in cfg:
        if key == "hydra":
            continue
        try:
            node = cfg[key]
            if isinstance(node, DictConfig):
                OmegaConf.to_container(node, resolve=True)
        except InterpolationToMissingValueError:
            continue
        except InterpolationResolutionError as err:
            where = _full_key(err) or str(key)
            first = str(err).strip().splitlines()[0]
            raise UserError(f"{where}: {first}; fix the ${{...}} reference or give a value") from None


def compose_checked(overrides: list[str], multirun: bool) -> list[DictConfig]:
    """Compose every job the command line describes; any failure is one UserError line."""
    reference = _compose([])
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise UserError(f"cannot parse the command line: {str(err).strip().splitlines()[0]}") from None
    jobs = _jobs(parsed) if multirun else [overrides]
    configs = []
    for job in jobs:
        try:
            cfg = _compose(job)
        except (HydraException, OmegaConfBaseException) as err:
            bad = next((o for o in job if o.lstrip("+").split("=")[0] in str(err)), "")
            raise UserError(explain(err, bad, reference)) from None
        check_appended_keys(OverridesParser.create().parse_overrides(job), cfg, reference)
        check_interpolations(cfg)
        check_names(cfg)  # registry names (metric, allocation, quantizer, policy), after cfg.plugins
        configs.append(cfg)
    return configs


def _quote(path: Path) -> str:
    text = str(path).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def prepare(argv: list[str]) -> Prepared:
    """Check the command line and claim the run (or sweep) folder; the argv Hydra should run."""
    flags = [a for a in argv if a.startswith("-")]
    multirun = any(a in RUN_FLAGS for a in flags)
    if any(a not in RUN_FLAGS for a in flags):
        return Prepared(argv=argv, claimed=None, multirun=multirun)  # --cfg, --help, ...: Hydra's own business
    overrides = [a for a in argv if a not in RUN_FLAGS]
    configs = compose_checked(overrides, multirun)
    for cfg in configs:
        check_folder_names(cfg)  # before Hydra makes any folder from them
        check_writable(cfg.results_dir)
    cfg = configs[0]
    multirun = multirun or str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    dir_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if any(o.lstrip("+").startswith(f"{dir_key}=") for o in overrides):  # the user's folder: not ours to delete
        if not multirun:  # Hydra would write its .hydra/ files into a finished run's folder before the job starts
            check_no_record(Path(cfg.hydra.run.dir))
        return Prepared(argv=argv, claimed=None, multirun=multirun,
                        sweep_dir=Path(cfg.hydra.sweep.dir) if multirun else None)
    if multirun:
        claimed = claim(Path(cfg.results_dir), "")
    else:
        path_given = any(o.lstrip("+").startswith("model.path=") for o in overrides)
        label = model_label(cfg.model.name, OmegaConf.select(cfg, "model.path", throw_on_missing=False), path_given)
        suffix = f"_{cfg.tag}" if cfg.tag else ""
        claimed = claim(Path(cfg.results_dir), f"{label}_{cfg.quant.name}{suffix}")
    # flags first: Hydra's argparse takes the overrides as one positional list
    return Prepared(argv=[*flags, *overrides, f"{dir_key}={_quote(claimed)}"], claimed=claimed, multirun=multirun,
                    sweep_dir=claimed if multirun else None)
