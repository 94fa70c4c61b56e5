"""Entry point: python run.py [group=option ...] [key=value ...]

    python run.py                                    # DynaMo harness on the embedded default
    python run.py model=qwen-moe dataset=wikitext2 eval=paper
    python run.py -m model=tiny-olmoe,tiny-qwen-moe  # a sweep (Hydra multirun)

See README.md and conf/config.yaml. Every run writes results/runs/<run-id>/result.json.
"""

from __future__ import annotations

import gc
import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dynamo.config import CONF_DIR, SCHEMAS, group_choices, register_hydra
from dynamo.errors import UserError

log = logging.getLogger("dynamo")
GROUPS = (*SCHEMAS, "experiment")

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

    from dynamo.pipeline import run
    from dynamo.report import summary_table
    from dynamo.resume import discard_run_dir, reusable_record

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    reused = reusable_record(cfg)
    if reused is not None:
        # A re-launched sweep recomputes only what has no record yet; its reused jobs leave no folder.
        print(f"reusing {reused} (same config_hash; force=true recomputes)")
        logging.shutdown()
        discard_run_dir(run_dir, reused)
        return
    try:
        record = run(cfg, run_dir, list(hydra_cfg.overrides.task))
    except UserError as err:
        # A rejected run leaves nothing behind: no record, no half-filled run folder.
        logging.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        # Multirun jobs share this process: free the model before the next one, on the GPU too
        # (only where this process has used CUDA; asking otherwise would start a CUDA context).
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    print(summary_table(record, list(cfg.dataset.known)))
    print(f"record: {run_dir / 'result.json'}")


if __name__ == "__main__":
    try:
        check_group_choices(sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
