"""Every `python run.py ...` command in README.md runs, under smoke settings.

Each command is run in process through run.py's command line with smaller settings prepended
(`experiment=smoke` and SMOKE below: one 128-token window per dataset, no W&B, no figures, no
lm-eval, which tests/test_run.py's smoke run covers; the code and chat domains only, one known and
one novel, where the command does not choose) and the README's own overrides after them, so the
command's choices win. A sweep runs its first job only (each
swept key at its first value, an experiment preset's sweeper.params included). A command whose
model or data live on the Hugging Face hub must end, offline, in the one `error:` line the README
documents. The few that cannot run here are listed in SKIPPED with the reason; a SKIPPED entry
that no longer matches a README command fails, and so does a README with too few commands.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO
from dynamo.config import CONF_DIR, register_hydra

register_hydra()
README = REPO / "README.md"
SMOKE = ["logger=none", "eval.max_windows=1", "eval.seqlen=128", "analysis.windows=1", "analysis.seqlen=128",
         "calib.windows=1", "calib.seqlen=128", "eval.lm_eval.limit=1", "eval.stream_windows=4",
         "quant.switching.sample_windows=1", "analysis.figures=false", "eval.lm_eval.enabled=false"]
DOMAINS = ["code", "chat"]
SKIPPED = {
    "-m experiment=table1_ppl hydra/launcher=slurm": "submits to a SLURM cluster (tests/test_launchers.py checks the config)",
    "-m hydra/launcher=slurm model=olmoe dataset=wikitext2 eval=paper quant=fp16,rtn_4bit,gptq_4bit":
        "submits to a SLURM cluster (tests/test_launchers.py checks the config)",
    "-m hydra/launcher=slurm hydra.launcher.partition=a100 hydra.launcher.timeout_min=600 "
    "hydra.launcher.mem_gb=128 hydra.launcher.gpus_per_node=1 model=mixtral quant=gptq_3bit,gptq_4bit":
        "submits to a SLURM cluster (tests/test_launchers.py checks the config)",
}
OFFLINE_ERROR = "Offline, use"  # the hint that ends the hub's one-line errors (data.py, models.py)


def readme_commands() -> list[str]:
    """The argument strings of every `python run.py` command in README.md, once each, in order."""
    text = re.sub(r"\\\n\s*", " ", README.read_text())  # join continued lines
    found = []
    for line in text.splitlines():
        for span in re.findall(r"`([^`]*python run\.py[^`]*)`", line) or [line]:
            match = re.search(r"python run\.py(.*)", span)
            if match:
                args = " ".join(match.group(1).split(" #")[0].split())
                if args not in found:
                    found.append(args)
    return found


COMMANDS = readme_commands()


def test_the_readme_has_commands_and_every_skip_names_one():
    assert len(COMMANDS) >= 25, COMMANDS
    assert set(SKIPPED) <= set(COMMANDS), set(SKIPPED) - set(COMMANDS)


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def first_job(args: list[str]) -> list[str]:
    """A sweep's first job: each swept key at its first value, the preset's sweeper.params included."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and "," in value and not value.startswith(("[", "{", "'", '"')):
            value = value.split(",")[0]
        out.append(f"{key}={value}" if sep else arg)
    preset = next((a.split("=", 1)[1] for a in out if a.startswith("experiment=")), None)
    if preset:
        params = _compose([f"experiment={preset}"]).hydra.sweeper.params or {}
        given = {a.split("=", 1)[0] for a in out}
        out += [f"{k}={str(v).split(',')[0]}" for k, v in params.items() if k not in given]
    return out


def needs_hub(overrides: list[str]) -> bool:
    cfg = _compose([o for o in overrides if o not in ("-m", "--multirun")])
    path = OmegaConf.select(cfg, "model.path", throw_on_missing=False) or ""
    local_model = path.startswith(("/", ".", "~")) or (REPO / path).exists()
    hub_data = any(str(s.kind) in ("hub", "SourceKind.hub") for s in cfg.dataset.sources.values())
    return not local_model or hub_data


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory):
    """Paths for the README's placeholders: a user's .jsonl, a checkpoint, an exported packed model."""
    folder = tmp_path_factory.mktemp("readme")
    data = folder / "file.jsonl"
    data.write_bytes((REPO / "assets/data/code/test.jsonl").read_bytes())
    return {"/my/file.jsonl": str(data), "/my/checkpoint": str(REPO / "assets/models/tiny-qwen-moe"),
            "packed": {}}


def smoke_settings(args: list[str]) -> list[str]:
    """The settings prepended to a README command (see the module docstring)."""
    preset = any(a.startswith("experiment=") for a in args)
    smoke = [*([] if preset else ["experiment=smoke"]), *SMOKE]
    cfg = _compose([*smoke, *[a for a in args if a not in ("-m", "--multirun")]])
    if not any(a.startswith("eval.datasets=") for a in args) and set(DOMAINS) <= set(cfg.dataset.sources) \
            and cfg.eval.datasets is None:
        smoke.append(f"eval.datasets=[{','.join(DOMAINS)}]")
    return smoke


def run_command(cli, command: str, results) -> tuple[int, str, list[str]]:
    args = first_job(shlex.split(command))
    smoke = smoke_settings(args)
    status, _, err = cli(*smoke, f"results_dir={results}", *args)
    return status, err, [*smoke, *args]


def _packed_model(cli, tmp_path, placeholders) -> str:
    """results/runs/<run>/packed_model: from the README's own export command (run here if not yet)."""
    if "path" not in placeholders["packed"]:
        results = tmp_path / "export"
        status, err, _ = run_command(cli, "quant.export=packed", results)
        assert status == 0, err[-3000:]
        placeholders["packed"]["path"] = str(next(results.rglob("packed_model")))
    return placeholders["packed"]["path"]


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs_under_smoke_settings(command, cli, tmp_path, placeholders):
    if command in SKIPPED:
        pytest.skip(SKIPPED[command])
    for placeholder in ("/my/file.jsonl", "/my/checkpoint"):
        command = command.replace(placeholder, placeholders[placeholder])
    if "<run>/packed_model" in command:
        command = command.replace("results/runs/<run>/packed_model", _packed_model(cli, tmp_path, placeholders))
    results = tmp_path / "runs"
    status, err, argv = run_command(cli, command, results)
    if needs_hub(argv) and "-m" in argv:  # a sweep records the failed job and exits 1
        failures = [json.loads(p.read_text()) for p in results.rglob("failed.json")]
        assert status == 1 and failures and all(OFFLINE_ERROR in f["error"] for f in failures), err[-3000:]
        return
    if needs_hub(argv):
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert status == 2 and len(errors) == 1 and OFFLINE_ERROR in errors[0], err[-3000:]
        return
    assert status == 0, err[-3000:]
    assert list(results.rglob("result.json")), "the command wrote no record"
    if "quant.export=packed" in command:
        placeholders["packed"]["path"] = str(next(results.rglob("packed_model")))
