"""quant.export: the registry's checks and the GPTQModel-style export, and config hashes that stay."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir

from dynamo.adapters import moe_layers
from dynamo.config import CONF_DIR, register_hydra, to_container
from dynamo.errors import UserError
from dynamo.export import EXPORTERS, check_export, write_export
from dynamo.export.gptqmodel import EXPORT_FILE
from dynamo.quant import QSpec, QuantPlan
from dynamo.records import config_hash

from tiny_families import build

register_hydra()
SOURCES = {"code": None, "chat": None}


def compose_run(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=["experiment=smoke", *overrides])


def check(cfg, model) -> None:
    """check_export with the nodes the pipeline passes it."""
    check_export(cfg.quant, cfg.model, cfg.analysis, model, SOURCES, cfg.dataset.name)


def test_every_export_format_has_an_exporter():
    from dynamo.config import ExportFormat

    assert set(EXPORTERS) == set(ExportFormat) - {ExportFormat.none}


@pytest.mark.parametrize("overrides,message", [
    (["quant.export_packed=true"], "replaced by quant.export=packed"),
    (["quant.export_dataset=chat"], "use quant.export=dequantized"),
    (["quant.export=gptqmodel", "quant.export_dataset=chat"], "only the dequantized export holds"),
    (["quant=gptq_3bit", "quant.export=dequantized", "quant.export_dataset=chat"], "switches the model with DQS"),
    (["quant.export=packed", "quant.export_dataset=chat"], "use quant.export=dequantized"),
    (["quant=bnb_nf4", "quant.export=dequantized"], "rtn or gptq"),
    (["quant=gptq_3bit", "quant.export=gptqmodel"], "fused in 3-D parameters"),
])
def test_exports_a_run_cannot_write_are_refused_before_any_work(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        check(compose_run(*overrides), build("olmoe"))


def test_gptqmodel_export_where_the_format_can_say_it(tmp_path):
    """ModuleList experts (the DeepSeek layout), widths GPTQModel packs: the quantize config is written."""
    model = build("deepseek")
    check(compose_run("quant=gptq_3bit", "quant.export=gptqmodel"), model)
    with pytest.raises(UserError, match=r"can choose \[6\]-bit experts.*quant.export=dequantized"):
        check(compose_run("quant.export=gptqmodel"), model)  # dynamo_3bit may pick 6 bits

    cfg = compose_run("quant=gptq_3bit", "quant.export=gptqmodel")
    plan = QuantPlan(method="gptq", default=QSpec(3), shared_default=16)
    plan.save(tmp_path / "plan.json")
    export = write_export(SimpleNamespace(model=model), None, cfg.quant, cfg.model, tmp_path)
    written = json.loads((tmp_path / EXPORT_FILE).read_text())
    assert export["path"] == EXPORT_FILE and written["bits"] == 3 and written["quant_method"] == "gptq"
    assert any(rule.startswith("-:") for rule in written["dynamic"])  # shared experts and attention stay 16-bit

    plan.set_expert_bits(next(iter(moe_layers(model))).index, 0, 6)  # a plan file could still ask for 6 bits
    plan.save(tmp_path / "plan.json")
    with pytest.raises(UserError, match="GPTQModel packs only.*quant.export=dequantized"):
        write_export(SimpleNamespace(model=model), None, cfg.quant, cfg.model, tmp_path)


def test_the_export_keys_at_their_defaults_keep_old_hashes():
    config = to_container(compose_run())
    before = json.loads(json.dumps(config))
    for key in ("export", "export_dataset"):  # a config from before quant.export existed
        del before["quant"][key]
    assert config_hash(config) == config_hash(before)
    assert config_hash(to_container(compose_run("quant.export=dequantized"))) != config_hash(config)
