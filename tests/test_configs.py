"""Every config in conf/ composes, and the schemas reject typos with a useful message."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from dynamo.config import CONF_DIR, SCHEMAS, group_choices, register_hydra

register_hydra()
GROUPS = [*SCHEMAS, "experiment"]


def _compose(overrides, hydra_node=False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_node)


def test_default_config_is_the_embedded_default():
    cfg = _compose([])
    assert (cfg.model.name, cfg.dataset.name, cfg.quant.name, cfg.eval.name) == ("testbed-qwen-moe", "embedded",
                                                                                   "dynamo_3bit", "default")
    assert cfg.model.trust_remote_code is False
    assert cfg.model.path.endswith("assets/models/testbed-qwen-moe")
    assert cfg.model.bos_windows is True, "the testbed was trained with BOS-led windows (its training.json)"
    assert set(cfg.dataset.known) <= set(cfg.dataset.sources)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_choices(g)])
def test_every_option_composes(group, option):
    cfg = _compose([f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    if group in SCHEMAS:
        assert cfg[group].name == option, f"conf/{group}/{option}.yaml must say name: {option}"


def test_only_deepseek_moe_opts_in_to_remote_code():
    opted = [m for m in group_choices("model") if _compose([f"model={m}"]).model.trust_remote_code]
    assert opted == ["deepseek-moe"]


def test_misspelt_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="seqln"):
        _compose(["eval.seqln=128"])


def test_wrong_type_fails_at_composition():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose(["eval.seqlen=long"])


def test_unknown_enum_value_lists_the_valid_ones():
    with pytest.raises(ConfigCompositionException) as err:
        _compose(["logger=wandb", "logger.mode=sometimes"])
    assert "offline" in str(err.value.__cause__ or err.value)


def test_run_dir_names_model_quant_and_tag():
    cfg = _compose(["tag=abl", "model=tiny-qwen-moe"], hydra_node=True)
    assert cfg.hydra.run.dir.endswith("_tiny-qwen-moe_dynamo_3bit_abl")
    assert _compose([], hydra_node=True).hydra.run.dir.endswith("_testbed-qwen-moe_dynamo_3bit")


def test_unknown_group_option_is_caught_before_hydra_starts():
    import importlib.util

    from conftest import REPO
    from dynamo.errors import UserError

    spec = importlib.util.spec_from_file_location("run_entry", REPO / "run.py")
    run_entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_entry)
    run_entry.check_group_choices(["model=tiny-olmoe,tiny-qwen-moe", "eval.seqlen=5", "experiment=null"])
    with pytest.raises(UserError, match="unknown quant 'gptq_5bit'; choose one of: bnb_int8, bnb_nf4, dynamo_3bit"):
        run_entry.check_group_choices(["quant=gptq_5bit"])
    with pytest.raises(UserError, match="unknown model 'olmo'"):
        run_entry.check_group_choices(["-m", "model=tiny-olmoe,olmo"])
