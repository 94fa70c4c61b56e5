"""Every `python run.py ...` command of README.md and docs/*.md is a run the harness accepts.

Each command is checked without model work, in this process: run.py's group check, then the
preflight's composition of every job it describes (an experiment preset's sweeper.params swept as
Hydra's sweeper would), schema, `${...}` and registry names, then for each job the checks the
pipeline makes before it loads a model (`check_switching`, `validate_run`: value ranges, quantizer
options, every data file it reads, a local checkpoint). The one error allowed is the hub's one
`error:` line that the docs promise offline (a job whose data live on the hub reads them here). A
command on a folder that an earlier run writes (`results/runs/<run>/...`) is composed only;
tests/test_run.py runs the same overrides on a real export. A few commands, each taking a path that
no other test runs end to end, really run under smoke settings (`SLOW_RUNS`, marked slow).
"""

from __future__ import annotations

import shlex

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from conftest import REPO
from dynamo.config import CONF_DIR, register_hydra
from dynamo.errors import UserError
from test_docs_pages import all_commands, words_of
from test_launchers import LAUNCHERS

register_hydra()
SMOKE = ["logger=none", "eval.max_windows=1", "eval.seqlen=128", "analysis.windows=1", "analysis.seqlen=128",
         "calib.windows=1", "calib.seqlen=128", "eval.lm_eval.limit=1", "eval.stream_windows=4",
         "quant.switching.sample_windows=1", "analysis.figures=false", "eval.lm_eval.enabled=false"]
DOMAINS = ["code", "chat"]  # the smoke runs' datasets where the command does not choose: one known, one novel
RUN_FLAGS = ("-m", "--multirun")
PRODUCED = "results/runs/<run>/"  # a folder an earlier run writes: composed only (see the docstring)
OFFLINE_ERROR = "Offline, use"  # the hint that ends the hub's one-line errors (data.py, models.py)
# The real runs, each for a path nothing else runs end to end from the command line.
SLOW_RUNS = {
    "plugins=[experiments/ablation.py] quant=example_greedy analysis.channel_metric=act_l2_plain":
        "a plugin's metric and allocation rule (tests/test_extension.py relies on it)",
    "-m model=tiny-olmoe,tiny-qwen-moe eval.seqlen=256,512": "a sweep through run.py's multirun path",
    "dataset=local dataset.path=/my/file.jsonl": "a user's own file, its first 25% held out for calibration",
    "quant=bnb_nf4": "the bitsandbytes quantizer",
}


def run_py_commands() -> list[str]:
    """The arguments of every `python run.py` command of the pages, once each, in order."""
    found = []
    for command in all_commands():
        words = words_of(command)
        if words[:2] == ["python", "run.py"]:
            found.append(" ".join(words[2:]))  # unquoted, as the pages mostly write them
    return found


COMMANDS = run_py_commands()


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def preset_sweep(overrides: list[str]) -> list[str]:
    """An experiment preset's hydra.sweeper.params as overrides, for the keys the command leaves alone."""
    preset = next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")), None)
    params = (_compose([f"experiment={preset}"]).hydra.sweeper.params or {}) if preset else {}
    given = {o.lstrip("+").split("=", 1)[0] for o in overrides}
    return [f"{key}={value}" for key, value in params.items() if key not in given]


def check_command(run_py, args: list[str], files: bool = True) -> None:
    """What run.py and the pipeline check before any model work, for every job of the command (without
    `files`, what needs no file: a folder that an earlier run writes is not there yet)."""
    from dynamo.pipeline import check_switching, selected_sources
    from dynamo.preflight import compose_checked
    from dynamo.validate import validate_run

    run_py.check_group_choices(args)
    overrides = [a for a in args if a not in RUN_FLAGS]
    configs = compose_checked([*overrides, *preset_sweep(overrides)], multirun=len(overrides) < len(args))
    if not files:
        return
    for cfg in configs:
        with open_dict(cfg):
            del cfg["hydra"]  # a job's config as the pipeline gets it, without Hydra's own node
        check_switching(cfg)
        validate_run(cfg, selected_sources(cfg))


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory):
    """Paths for the pages' placeholders: a user's .jsonl, a checkpoint, a run's folder name."""
    data = tmp_path_factory.mktemp("readme") / "file.jsonl"
    data.write_bytes((REPO / "assets/data/code/test.jsonl").read_bytes())
    return {"/my/file.jsonl": str(data), "/my/checkpoint": str(REPO / "assets/models/tiny-qwen-moe"),
            "<run>": "2026-01-01_00-00-00-000-a1b2_testbed-qwen-moe_dynamo_3bit"}


def with_placeholders(command: str, placeholders: dict) -> list[str]:
    for placeholder, path in placeholders.items():
        command = command.replace(placeholder, path)
    return shlex.split(command)


def test_the_pages_have_commands_and_every_slow_run_names_one():
    assert len(COMMANDS) >= 40, COMMANDS
    assert set(SLOW_RUNS) <= set(COMMANDS), set(SLOW_RUNS) - set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_composes_and_passes_the_checks_made_before_model_work(command, run_py_module, placeholders):
    args = with_placeholders(command, placeholders)
    launcher = next((a.split("=", 1)[1] for a in args if a.startswith("hydra/launcher=")), None)
    if launcher is not None:  # its schema comes with its plugin, the optional cluster extra
        pytest.importorskip(LAUNCHERS[launcher][0], reason="pip install -e \".[cluster]\" composes it")
    try:
        check_command(run_py_module, args, files=PRODUCED not in command)
    except UserError as err:
        assert OFFLINE_ERROR in str(err), f"python run.py {command}: error: {err}"


@pytest.mark.parametrize("args, message", [
    (["model=typo"], "unknown model 'typo'"),
    (["quant.bitz=3"], "unknown key 'quant.bitz'"),
    (["-m", "eval.seqlen=1,512"], "eval.seqlen=1 must be >= 2"),
    (["dataset=local", "dataset.path=/nonexistent/file.jsonl"], "/nonexistent/file.jsonl"),
    (["quant=fp16", "eval=stream"], "eval.stream serves datasets through DQS"),
])
def test_a_command_the_run_would_refuse_is_refused_here(run_py_module, args, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        check_command(run_py_module, args)


def smoke_settings(args: list[str]) -> list[str]:
    """The settings prepended to a real run (the command's own overrides come after them and win)."""
    preset = any(a.startswith("experiment=") for a in args)
    smoke = [*([] if preset else ["experiment=smoke"]), *SMOKE]
    cfg = _compose([*smoke, *[a for a in args if a not in RUN_FLAGS]])
    if not any(a.startswith("eval.datasets=") for a in args) and set(DOMAINS) <= set(cfg.dataset.sources) \
            and cfg.eval.datasets is None:
        smoke.append(f"eval.datasets=[{','.join(DOMAINS)}]")
    return smoke


def first_job(args: list[str]) -> list[str]:
    """A sweep's first job: each swept key at its first value."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and "," in value and not value.startswith(("[", "{", "'", '"')):
            value = value.split(",")[0]
        out.append(f"{key}={value}" if sep else arg)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("command", SLOW_RUNS)
def test_command_runs_under_smoke_settings(command, cli, tmp_path, placeholders):
    args = first_job(with_placeholders(command, placeholders))
    results = tmp_path / "runs"
    status, _, err = cli(*smoke_settings(args), f"results_dir={results}", *args)
    assert status == 0, err[-3000:]
    assert list(results.rglob("result.json")), "the command wrote no record"
