"""quant.export=packed: the BQ model with its routed experts packed, saved as a transformers checkpoint.

At the end of a run (after every evaluation, which runs on the fake-quantized model), the
switcher (if any) goes back to BQ, the codes kept by the quantizer are packed with the DQS
channel rows (dynamo.packed.model), the packed layers replace the dense experts, and the model
and tokenizer are saved to run_dir/packed_model, behind the loading guard (dynamo/packed/format.py: without this
project, transformers refuses it instead of loading random experts), written to a temporary folder
first so a failure leaves nothing half-written. `python run.py model=local model.path=<that folder>
quant=fp16` evaluates the packed model with the same protocol.
"""

from __future__ import annotations

from pathlib import Path

from ..adapters import moe_layers
from ..config import AnalysisConfig, ChannelUnit, ModelConfig, QuantConfig
from ..errors import UserError
from ..registry import QUANTIZERS
from .files import atomic_dir, carry_training_record, nbytes, training_record
from ..switching.slotset import SLOT_SETS_DIR, packed_fingerprint, save_slot_set
from ..packed.format import guard_checkpoint

EXPORT_DIR = "packed_model"
LOADING_NOTE = """# Packed DynaMo checkpoint

Routed experts hold packed low-bit codes (dynamo_kernels/README.md in the DynaMo harness), described by
`quantization_config` (`quant_method: dynamo`) in config.json. Only the harness reads them, so
config.json names the model type `dynamo_packed` (the real one is under `dynamo_packed`): without
the harness, `AutoModelForCausalLM.from_pretrained` refuses this folder ("contains custom code");
with `trust_remote_code=True` the shipped `dynamo_packed.py` imports the harness or says how to get
it. No tool can load it with randomly initialised experts.

With the harness on the Python path (no remote code needed):

    from dynamo.packed.format import load_packed
    model = load_packed("<this folder>")

or evaluate it with `python run.py model=local model.path=<this folder> quant=fp16`.
A `slot_sets/` folder, when present, holds the adaptive DQS slot set of each dataset the run switched
to; a reloaded model switches to one by name (a copy into its slot tables):

    from dynamo.switching.adaptive import AdaptiveSwitcher
    switcher = AdaptiveSwitcher.for_saved_sets(model, "<this folder>/slot_sets")
    switcher.switch_to_saved("<dataset>")
For a checkpoint that lm-eval, vLLM or a notebook loads without the harness, export the run with
`quant.export=dequantized` (same values, no memory saving).
"""


def check(quant: QuantConfig, model_cfg: ModelConfig, analysis: AnalysisConfig, model) -> None:
    if not QUANTIZERS.get(quant.method).plan:
        raise UserError(f"quant.export=packed needs integer codes (quant.method rtn or gptq), not "
                        f"quant.method={quant.method}")
    if any(layer.adapter.storage != "fused_3d" for layer in moe_layers(model)):
        raise UserError(f"quant.export=packed saves fused-expert (transformers-5) models; {model_cfg.name} keeps its "
                        f"experts in a ModuleList (use quant.export=dequantized or gptqmodel, or run "
                        f"dynamo.packed.model.packed_forward on it)")
    if quant.switching.enabled and analysis.channel_unit != ChannelUnit.row:
        raise UserError("quant.export=packed keeps the DQS cache as output rows: use analysis.channel_unit=row")


def write(loaded, stage, quant: QuantConfig, model_cfg: ModelConfig, run_dir: Path) -> dict:
    """Pack, attach and save; returns what the record keeps under "export"."""
    from ..packed.model import attach_packed, pack_experts

    codes = stage.take_codes()  # the stage lets go of them: packed below, their memory goes back
    if codes is None:
        raise UserError("quant.export=packed: the quantizer kept no codes")
    model = loaded.model
    cache, slot_sets = None, {}
    if stage.switcher is not None:
        stage.switcher.restore_bq()
        # the paper policy's channel cache travels as packed channel rows; the adaptive policy's per-dataset
        # slot sets (each evaluated dataset's, kept by the switcher) go to slot_sets/ beside the checkpoint
        cache = getattr(stage.switcher, "cache", None)
        slot_sets = getattr(stage.switcher, "history", {})
    attach_packed(model, pack_experts(model, codes, cache))
    del codes
    target = run_dir / EXPORT_DIR
    meta = {**stage.switcher.summary(), "master": _master_hint(model_cfg)} if slot_sets else {}
    save_packed(model, loaded.tokenizer, target, training_record(model_cfg), slot_sets, meta)
    dqs = ("paper channel rows" if cache is not None else
           f"adaptive slot sets: {', '.join(sorted(slot_sets))}" if slot_sets else
           "none: no dataset was switched to" if stage.switcher is not None else "none")
    out = _memory(model, stage.quantization["bits"]) | {"dqs": dqs, "path": EXPORT_DIR,
                                                        "checkpoint_nbytes": nbytes(target)}
    if slot_sets:
        out["slot_sets"] = {"path": f"{EXPORT_DIR}/{SLOT_SETS_DIR}", "names": sorted(slot_sets),
                            "nbytes": nbytes(target / SLOT_SETS_DIR)}
    return out


def _master_hint(model_cfg: ModelConfig) -> str | None:
    """Where a reloaded model can read the FP16 experts to switch to new windows (a local checkpoint)."""
    path = Path(str(model_cfg.path))
    return str(path.resolve()) if path.is_dir() else None


def save_packed(model, tokenizer, target: Path, training: Path | None = None, slot_sets: dict | None = None,
                meta: dict | None = None) -> None:
    """save_pretrained of a model with attached packed experts, behind the loading guard, all or nothing;
    `training`: the source's training record, carried along (export.files.training_record); `slot_sets`:
    the adaptive switch's per-dataset sets (name -> SlotSet), written to slot_sets/ with `meta`."""
    with atomic_dir(target) as tmp:
        if slot_sets:
            fp = packed_fingerprint(model)
            for name, slots in sorted(slot_sets.items()):
                save_slot_set(tmp / SLOT_SETS_DIR, name, slots, fp, {**(meta or {}), "dataset": name})
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        carry_training_record(training, tmp)
        guard_checkpoint(tmp)
        (tmp / "README.md").write_text(LOADING_NOTE)


def _memory(model, bits: dict) -> dict:
    """Measured bytes of the packed experts against the bit accounting of the plan."""
    from ..packed.model import packed_modules

    packed = [(name, p.numel() * p.element_size()) for module in packed_modules(model).values()
              for name, p in module.named_parameters()]
    rows = sum(n for name, n in packed if name.startswith("channels."))
    stacks = sum(n for _, n in packed) - rows
    accounted = bits["experts"] * bits["expert_params"] / 8
    return {"expert_nbytes": stacks, "channel_rows_nbytes": rows, "accounted_expert_nbytes": round(accounted),
            "expert_nbytes_over_accounting": round(stacks / accounted, 5),
            "fp16_expert_nbytes": 2 * bits["expert_params"]}
