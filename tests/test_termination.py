"""SIGTERM and Ctrl-C end a run with one line and leave nothing behind; a SIGKILLed run's temporary
data is removed by the next run (issue 29: 7.3 GB of KL reference left after 10 minutes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO

SMOKE = ("experiment=smoke", "logger=none", "eval=ppl", "eval.seqlen=64", "eval.datasets=[code]", "quant=rtn_4bit")


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    root = tmp_path / "scratch"
    monkeypatch.setenv("DYNAMO_SCRATCH", str(root))
    return root


@pytest.mark.parametrize("how, status, name", [("sigterm", 143, "SIGTERM"), ("ctrl_c", 130, "SIGINT")])
def test_a_signal_during_the_fp16_pass_is_one_line_and_leaves_nothing(cli, tmp_path, tiny_model_dir, scratch,
                                                                        monkeypatch, how, status, name):
    import dynamo.pipeline

    seen = []

    def interrupted(*args, **kwargs):
        # the KL reference pass is running: its temporary folder exists under this process's scratch folder
        seen.extend(p for p in scratch.rglob("dynamo-kl-ref-*"))
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    monkeypatch.setattr(dynamo.pipeline, "token_perplexity", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    results = tmp_path / "runs"
    code, _, err = cli(*SMOKE, f"results_dir={results}", "model=local", f"model.path={tiny_model_dir}")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == status and len(errors) == 1 and f"stopped by {name}" in errors[0], err[-2000:]
    assert "Traceback" not in err
    assert seen, "the KL reference folder was not under the scratch root"
    assert not any(p.exists() for p in seen), "the KL reference's temporary folder was left behind"
    assert not results.exists() or not any(results.iterdir()), "the unfinished run's folder was left behind"
    assert signal.getsignal(signal.SIGTERM) == before, "run.py's SIGTERM handler outlived the run"


def test_a_sigkilled_runs_scratch_folder_is_removed_by_the_next_run(scratch):
    from dynamo.scratch import process_dir, sweep_stale

    owner = subprocess.Popen([sys.executable, "-c", "from dynamo.scratch import process_dir; d = process_dir(); "
                              "(d / 'kl.bin').write_bytes(b'x' * 1000); print(d, flush=True); "
                              "import time; time.sleep(60)"],
                             cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    left = owner.stdout.readline().strip()
    assert left and os.path.isdir(left)
    assert sweep_stale(scratch) == [], "a live process's folder is never removed"
    owner.kill()
    owner.wait()
    mine = process_dir()  # what a new run does first
    assert not os.path.exists(left), "the killed run's data survived the next run's start"
    assert mine.is_dir() and mine.parent == scratch


def test_a_folder_of_a_reused_pid_is_removed_and_foreign_names_kept(scratch):
    from dynamo.scratch import sweep_stale

    scratch.mkdir()
    reused = scratch / f"{os.getpid()}-1"  # this pid, another start time: the owner is gone
    foreign = scratch / "not-a-pid"
    reused.mkdir()
    foreign.mkdir()
    assert sweep_stale(scratch) == [reused] and foreign.is_dir()
