"""Every launcher config in conf/hydra/launcher/ composes against its plugin's schema, offline.

The plugins are the optional `cluster` extra (pip install -e ".[cluster]"); without them these
tests skip and say so.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from dynamo.config import CONF_DIR, group_choices, register_hydra

register_hydra()
GROUP = "hydra/launcher"
# config name -> (plugin package, the launcher class the config must instantiate)
LAUNCHERS = {
    "slurm": ("hydra_plugins.hydra_submitit_launcher",
              "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    "parallel": ("hydra_plugins.hydra_joblib_launcher",
                 "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
}


def _launcher(name, *overrides):
    package = LAUNCHERS[name][0]
    try:
        installed = importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        installed = False
    if not installed:
        pytest.skip(f"{package} is not installed (pip install -e \".[cluster]\")")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"{GROUP}={name}", *overrides], return_hydra_config=True)
    assert cfg.hydra.runtime.choices[GROUP] == name
    return cfg.hydra.launcher


def test_every_launcher_config_is_tested_here():
    assert sorted(group_choices(GROUP)) == sorted(LAUNCHERS)


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_config_targets_its_plugin(name):
    assert _launcher(name)._target_ == LAUNCHERS[name][1]


@pytest.mark.parametrize("name,typo", [("slurm", "partiton"), ("parallel", "n_job")])
def test_a_misspelt_launcher_key_fails_at_composition(name, typo):
    with pytest.raises(ConfigCompositionException, match=typo):
        _launcher(name, f"hydra.launcher.{typo}=1")


def test_slurm_runs_each_job_on_one_gpu_by_default():
    launcher = _launcher("slurm")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 1, 1)
    assert launcher.partition is None and launcher.timeout_min > 0 and launcher.mem_gb > 0
    raw = OmegaConf.to_container(launcher, resolve=False)
    assert raw["submitit_folder"].startswith("${hydra.sweep.dir}/")  # job logs beside the sweep's records


def test_slurm_partition_time_memory_and_gpus_are_overridable():
    launcher = _launcher("slurm", "hydra.launcher.partition=a100", "hydra.launcher.timeout_min=600",
                         "hydra.launcher.mem_gb=128", "hydra.launcher.gpus_per_node=2")
    assert (launcher.partition, launcher.timeout_min, launcher.mem_gb, launcher.gpus_per_node) == ("a100", 600, 128, 2)


def test_slurm_config_becomes_the_sbatch_header(tmp_path, monkeypatch):
    launcher = _launcher("slurm")
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    # submitit refuses to build a SLURM executor where `srun` is missing: a stand-in on PATH
    (tmp_path / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path), prepend=os.pathsep)
    params = OmegaConf.to_container(launcher, resolve=False)
    params.pop("_target_")
    # the parameter mapping of SlurmLauncher.launch (hydra-submitit-launcher 1.2.0)
    executor = submitit.AutoExecutor(cluster="slurm", folder=str(tmp_path / "logs"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params["name"] = "run"
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    make_text = getattr(executor._executor, "_make_submission_file_text", None)
    if make_text is None:
        pytest.skip("this submitit version renders sbatch files differently")
    header = make_text("python run.py", "uid")
    for line in ("--gpus-per-node=1", "--ntasks-per-node=1", "--nodes=1", f"--time={launcher.timeout_min}",
                 f"--mem={launcher.mem_gb}GB", f"--cpus-per-task={launcher.cpus_per_task}"):
        assert f"#SBATCH {line}\n" in header, line
    assert "--partition" not in header  # none given: the cluster's default
