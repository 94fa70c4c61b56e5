"""Entry point: python run.py [group=option ...] [key=value ...]

    python run.py                                    # DynaMo harness on the embedded default
    python run.py model=qwen-moe dataset=wikitext2 eval=paper
    python run.py -m model=tiny-olmoe,tiny-qwen-moe  # a sweep (Hydra multirun)

See README.md and conf/config.yaml. Every run writes results/runs/<run-id>/result.json; bad input
is one `error:` line and exit status 2, leaving no folder; a sweep records a failed job in its
folder's failed.json, goes on, and exits 1.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from dynamo.config import CONF_DIR, SCHEMAS, group_choices, register_hydra
from dynamo.errors import UserError
from dynamo.rundir import (FAILED_FILE, OWNED_ENV, check_contained, check_folder_names, check_no_record, owned,
                           release)

log = logging.getLogger("dynamo")
GROUPS = (*SCHEMAS, "experiment")
# Sweep jobs refused before they had a folder of their own to hold failed.json (it escaped the sweep's
# folder, or holds another run's record): cli() lists them with the others and exits 1.
REFUSED_JOBS: list[dict] = []
# Exit statuses of a run ended by a signal: the shell's 128 + signal number (docs/operations.md, "Bad input, ...").
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Terminated(BaseException):
    """SIGTERM (SLURM's time-out, preemption, `kill`) as an exception, like Ctrl-C's KeyboardInterrupt,
    so every `with` block on the way out runs (the KL reference's temporary folder is removed)."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated()


def signal_line(err: BaseException) -> tuple[str, int]:
    """The one line and exit status of a run ended by SIGINT or SIGTERM."""
    signum = err.signum if isinstance(err, Terminated) else signal.SIGINT
    name = signal.Signals(signum).name
    return (f"error: stopped by {name}; the unfinished run's folder and temporary data were removed, finished "
            "records kept (run the same command again to resume)", SIGNAL_EXIT[signum])

register_hydra()


def check_group_choices(argv: list[str]) -> None:
    """Fail before Hydra starts, in one line, on `model=typo` (Hydra's message spans a screen)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if not sep or key not in GROUPS:
            continue
        choices = group_choices(key)
        for option in value.split(","):
            if option not in choices and not (key == "experiment" and option == "null"):
                raise UserError(f"unknown {key} '{option}'; choose one of: {', '.join(choices)}")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    import torch

    from dynamo.data import known_datasets
    from dynamo.pipeline import run
    from dynamo.records import record_of
    from dynamo.report import summary_table
    from dynamo.resume import discard_run_dir, reusable_record

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        check_folder_names(cfg)  # run.py refuses these before Hydra starts; Hydra driven another way lands here
        if multirun:  # a job's folder stays inside its sweep's
            check_contained(run_dir, Path(hydra_cfg.sweep.dir), "the job folder")
        elif owned(run_dir):
            check_contained(run_dir, Path(cfg.results_dir), "the run folder")
        reused = reusable_record(cfg)
        if reused is None:
            check_no_record(run_dir)  # never write into a finished run's folder (hydra.run.dir set to one)
    except UserError as err:
        logging.shutdown()
        print(f"error: {err}", file=sys.stderr)
        if multirun:  # the sweep goes on and counts it; nothing is written into a folder that is not the job's own
            REFUSED_JOBS.append({"job": hydra_cfg.job.num, "overrides": list(hydra_cfg.overrides.task),
                                 "error": f"error: {err}", "folder": str(run_dir)})
            return
        release(run_dir)
        sys.exit(2)
    if reused is not None:
        # A re-launched sweep recomputes only what has no record yet; its reused jobs leave no folder.
        print(f"reusing {reused} (same config_hash and input files; force=true recomputes)")
        logging.shutdown()
        discard_run_dir(run_dir, reused)
        return
    try:
        result = run(cfg, run_dir, list(hydra_cfg.overrides.task))
    except UserError as err:
        logging.shutdown()
        if multirun:  # a sweep goes on: the failure is recorded beside the sweep's records
            record_failure(run_dir, hydra_cfg, f"error: {err}")
            return
        # A rejected run leaves nothing behind: no record, no half-filled run folder (only its own).
        release(run_dir)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, Terminated) as err:
        # the pipeline's `with` blocks have closed (temporary KL reference removed); the folder goes too
        logging.shutdown()
        release(run_dir)
        line, status = signal_line(err)
        print(line, file=sys.stderr)
        sys.exit(status)
    except Exception as err:
        if not multirun:
            raise
        log.exception("job %s failed", hydra_cfg.job.num)  # the traceback stays in the job's log
        record_failure(run_dir, hydra_cfg, f"{type(err).__name__}: {err}")
        return
    finally:
        # Multirun jobs share this process: free the model before the next one, on the GPU too
        # (only where this process has used CUDA; asking otherwise would start a CUDA context).
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    print(summary_table(record_of(result), known_datasets(cfg.dataset)))
    print(f"record: {run_dir / 'result.json'}")


def record_failure(run_dir: Path, hydra_cfg, error: str) -> None:
    """failed.json in the failed job's folder: which job, its overrides, the error line."""
    from dynamo.records import write_json_atomic

    print(f"job {hydra_cfg.job.num} failed: {error}", file=sys.stderr)
    write_json_atomic(run_dir / FAILED_FILE, {"job": hydra_cfg.job.num, "overrides": list(hydra_cfg.overrides.task),
                                              "error": error})


def sweep_failures(sweep_dir: Path, since_ns: int) -> list[dict]:
    """The failed jobs of this sweep (a folder set by hand may hold older sweeps' failures)."""
    failures = []
    for path in sorted(sweep_dir.glob(f"*/{FAILED_FILE}")):
        if path.stat().st_mtime_ns >= since_ns:
            failures.append({**json.loads(path.read_text()), "folder": str(path.parent)})
    return sorted(failures, key=lambda f: f["job"])


def cli(argv: list[str]) -> int:
    """Check the command line, claim the run folder, run Hydra; the process's exit status."""
    from dynamo.preflight import prepare

    try:
        check_group_choices(argv)
        prepared = prepare(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(signal_line(err)[0], file=sys.stderr)
        return SIGNAL_EXIT[signal.SIGINT]
    if prepared.claimed is not None:
        os.environ[OWNED_ENV] = str(prepared.claimed)  # launcher subprocesses inherit it
    started_ns = time.time_ns()
    saved, sys.argv = sys.argv, [sys.argv[0], *prepared.argv]
    saved_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main()
        status = 0
    except SystemExit as done:  # a rejected run (2), a signal (130, 143) or Hydra's own failure (1)
        status = done.code if isinstance(done.code, int) else 1
    except (KeyboardInterrupt, Terminated) as err:  # outside a job (Hydra's start-up, between sweep jobs)
        line, status = signal_line(err)
        print(line, file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, saved_handler)
        sys.argv = saved
    refused, REFUSED_JOBS[:] = list(REFUSED_JOBS), []
    if status in SIGNAL_EXIT.values() and prepared.claimed is not None:
        release(prepared.claimed)  # a sweep's folder goes too unless a job in it finished its record
    if status:
        return status
    if refused or (prepared.sweep_dir is not None and prepared.sweep_dir.is_dir()):
        failures = refused
        if prepared.sweep_dir is not None and prepared.sweep_dir.is_dir():
            failures += sweep_failures(prepared.sweep_dir, started_ns - 1_000_000_000)  # coarse mtimes
        failures.sort(key=lambda f: f["job"])
        if failures:
            print(f"sweep: {len(failures)} job(s) failed:", file=sys.stderr)
            for f in failures:
                print(f"  job {f['job']} ({' '.join(f['overrides'])}): {f['error']}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
