"""Structured-config schemas for every Hydra config group, registered in Hydra's ConfigStore.

Each YAML under conf/<group>/ starts with `defaults: [<group>_schema, _self_]`, so a misspelt
key or a value of the wrong type fails at start-up. Fields that name an extension (quant.method,
quant.allocation.method, quant.switching.policy, analysis.channel_metric) are strings checked
against their tables in dynamo/registry.py, where implementations and plugins register. Beside the
name, a `params` block holds the settings that entry declares itself (a dataclass of its own,
checked by dynamo.registry.parse_params), so a new entry's settings need no field here.
The schemas mirror the code: a stage
receives its own node (cfg.model, cfg.eval, ...), never the whole config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"


class SourceKind(Enum):
    embedded = "embedded"  # shipped under assets/data/<domain>/{calib,test}.jsonl
    local = "local"        # a user's .jsonl / .txt file
    hub = "hub"            # a Hugging Face dataset through `datasets`


class CoveragePolicy(Enum):
    warn = "warn"                  # log the experts under calib.min_tokens
    rtn_fallback = "rtn_fallback"  # mark them: quantizers use RTN instead of GPTQ there
    route_all = "route_all"        # extra pass: every calibration token reaches them (statistics only)


class HessianWeighting(Enum):
    none = "none"                  # X^T X over routed tokens
    router = "router"              # X^T diag(r) X, r = the token's router weight for the expert


class LoggerBackend(Enum):
    none = "none"
    wandb = "wandb"


class WandbMode(Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class ModelConfig:
    name: str = MISSING
    path: str = MISSING                     # hub id or local directory
    revision: Optional[str] = None
    dtype: str = "auto"                     # auto | float32 | float16 | bfloat16
    device: str = "auto"                    # auto | cpu | cuda | cuda:N
    device_map: Optional[str] = None        # e.g. "auto" to spread a large model (accelerate)
    # Decoder layers stay in CPU memory and visit model.device one at a time (dynamo/offload.py): GPU memory
    # of about one layer, for models larger than the GPU; slower (each forward moves every layer)
    offload: bool = False
    trust_remote_code: bool = False         # only ever true when a config says so
    attn_implementation: Optional[str] = None
    max_length: Optional[int] = None        # context length; default: the model config's
    # Trained with a BOS token at every window start (scripts/train_embedded.py, Recipe.bos_windows): every
    # window it is evaluated, calibrated and analysed on is BOS + seqlen - 1 tokens too (dynamo/tokens.py)
    bos_windows: bool = False


@dataclass
class SourceConfig:
    kind: SourceKind = SourceKind.embedded
    path: Optional[str] = None              # hub dataset id, or local file; embedded: the domain
    name: Optional[str] = None              # hub dataset config name
    calib_split: str = "calib"
    test_split: str = "test"
    calib_data_files: Optional[str] = None  # hub: restrict a split to one shard (C4)
    test_data_files: Optional[str] = None
    calib_path: Optional[str] = None        # local: a separate calibration file
    calib_fraction: float = 0.25            # local, no calib_path: leading share of documents
    text_field: str = "text"
    separator: str = "\n\n"                 # documents are joined with this before tokenising
    max_documents: Optional[int] = None


@dataclass
class DatasetConfig:
    name: str = MISSING
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    known: list[str] = field(default_factory=list)  # DynaMo's known datasets (calibration)
    path: Optional[str] = None              # a user's file, added as one more dataset (novel unless in known)
    calib_path: Optional[str] = None        # its calibration/profiling file; None = its leading calib_fraction


class Fuse(Enum):
    """Paper Eq. 2: how the per-dataset expert significances become one (spec Step 2)."""
    mean = "mean"
    max = "max"
    geomean = "geomean"
    gaussian = "gaussian"  # diagonal Gaussian: its mean allocates, its std is kept as the dynamics


class ChannelUnit(Enum):
    row = "row"          # an output row of each projection (gate, up, down)
    neuron = "neuron"    # an intermediate neuron: gate row c, up row c and down column c together


@dataclass
class FcmConfig:
    m: float = 2.0                          # fuzzifier
    eps: float = 1e-5                       # stop when no membership moves more than this
    max_iter: int = 300
    overlap_margin: float = 0.1             # top-two memberships closer than this: the lower precision


@dataclass
class AllocationConfig:
    # a name in dynamo.registry.ALLOCATIONS (checked by check_names): uniform, moeptq, random (baselines),
    # fcm (paper Algorithm 1), budget (ours: least expected error at exactly target_bits), or a plugin's
    method: str = "uniform"
    target_bits: float = 3.0                # moeptq / random / budget: average code bits of routed experts
    low_bits: int = 2                       # moeptq / random
    high_bits: int = 4
    widths: list[int] = field(default_factory=lambda: [8, 6, 4, 2])  # fcm (one per cluster) / budget choices
    fuse: Fuse = Fuse.mean
    fcm: FcmConfig = field(default_factory=FcmConfig)
    seed: int = 0                           # random allocation
    params: dict[str, Any] = field(default_factory=dict)  # the rule's own settings (its registered dataclass)


class ChannelMode(Enum):
    fp16 = "fp16"        # experts a switch widens get their cached channels back in FP16
    requant = "requant"  # a switch re-quantizes changed experts' cached channels at their new width


@dataclass
class DetectorConfig:
    """Automatic dataset-shift detection from the live routing (ours; the paper switches by hand)."""
    # Defaults measured on tiny-olmoe, batches of 2 x 512 tokens: a stable domain stays at 0.001-0.003
    # bits, a full window of chat after code reaches 0.046 (eval=stream records the whole trace).
    window: int = 4                         # batches in the sliding window
    threshold: float = 0.02                 # mean per-layer Jensen-Shannon divergence (bits) that counts as a shift
    patience: int = 2                       # consecutive batches over the threshold before switching
    cooldown: int = 8                       # batches after a switch before the next one may fire


class SwitchCandidates(Enum):
    rows = "rows"              # output rows of every projection
    rows_cols = "rows_cols"    # rows and input columns under one budget
    experts8 = "experts8"      # whole experts raised to 8 bits
    lowrank = "lowrank"        # rank-1 components of the Hessian-weighted error per matrix (EoRA-like)
    rows_cols_lowrank = "rows_cols_lowrank"  # what a packed model can serve: rows, columns, low-rank
    all = "all"                # all four under one budget


class SwitchScoring(Enum):
    hessian = "hessian"        # second order: routed, router-weighted X^T X per expert (GPTQ's errors are correlated)
    output = "output"          # its diagonal E[x^2] only; gate/up errors carried to the expert's output
    local = "local"            # the diagonal, each projection's error in its own output space


class MasterLocation(Enum):
    host = "host"              # a copy of the experts in host RAM, in the model's dtype, taken before quantizing
    disk = "disk"              # read by slice from the checkpoint's safetensors when a switch needs them


@dataclass
class SwitchingConfig:
    """DynaMo's online stage (spec Step 3, DQS). `policy` picks what a switch restores:
    adaptive (ours): slots chosen per dataset from an FP16 master copy (candidates, scoring, budget_frac);
    paper: the FP16 cache of channels fixed offline, re-allocated per dataset (channel_mode, mix)."""
    enabled: bool = False
    policy: str = "adaptive"                # dynamo.registry.SWITCH_POLICIES: adaptive (ours) or paper
    # adaptive defaults: the best on held-out calib windows of the novel domains on both embedded models
    # (scripts/dqs_compare.py, results/diagnostics/dqs_compare_<model>.md; scoring and slot_bits: dqs_fidelity.py)
    budget_frac: float = 0.01               # adaptive: device-resident slot bytes / routed experts' FP16 bytes
    candidates: SwitchCandidates = SwitchCandidates.lowrank
    scoring: SwitchScoring = SwitchScoring.hessian
    slot_bits: int = 8                      # adaptive: slots (rows, columns, low-rank factors) as RTN-8 (8) or FP16 (16)
    master: MasterLocation = MasterLocation.host  # adaptive: where the FP16 experts a switch restores from live
    channel_mode: ChannelMode = ChannelMode.fp16
    mix: float = 1.0                        # paper: weight of the new dataset's significance against the known
                                            #   ones (1.0: the paper re-clusters on the new dataset alone)
    sample_windows: int = 4                 # calib-split windows (analysis.seqlen) a switch profiles; never test
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    params: dict[str, Any] = field(default_factory=dict)  # the policy's own settings (its registered dataclass)


class ExportFormat(Enum):
    """What a quantized run also writes at its end (dynamo/export/, docs/export.md)."""
    none = "none"
    packed = "packed"            # packed_model/: packed low-bit experts; loads with this harness only
    dequantized = "dequantized"  # dequantized_model/: a standard checkpoint holding the quantized values
    gptqmodel = "gptqmodel"      # gptqmodel_quantize_config.json: per-module widths (ModuleList experts only)


@dataclass
class QuantConfig:
    name: str = MISSING
    method: str = "none"                    # dynamo.registry.QUANTIZERS: none (16-bit), rtn, gptq, bnb
    bits: int = 16                          # routed experts (uniform plan)
    group_size: int = 128                   # input columns per scale/zero; -1 = per row
    sym: bool = False
    shared_expert_bits: Optional[int] = None  # None: same as bits
    act_order: bool = False                 # GPTQ: columns by decreasing Hessian diagonal (static groups)
    damp: float = 0.01                      # GPTQ: fraction of the mean Hessian diagonal added
    plan: Optional[str] = None              # a QuantPlan JSON to apply instead of the uniform plan
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    switching: SwitchingConfig = field(default_factory=SwitchingConfig)  # DQS, with fcm/budget allocations
    bnb_format: str = "nf4"                 # nf4 | int8
    # Also write the quantized model at the end of the run (dynamo/export/). packed keeps every
    # expert's integer codes (one byte per weight) until then.
    export: ExportFormat = ExportFormat.none
    export_dataset: Optional[str] = None    # DQS runs, export=dequantized: the model as switched to this dataset
    export_packed: bool = False             # replaced by export=packed; true is refused with that message
    params: dict[str, Any] = field(default_factory=dict)         # quant.method's own settings (its dataclass)
    export_params: dict[str, Any] = field(default_factory=dict)  # quant.export's own settings (its dataclass)


@dataclass
class AnalysisConfig:
    """DynaMo's multi-level analysis (spec Step 1): per-dataset channel and expert significance."""
    datasets: Optional[list[str]] = None    # None = dataset.known
    split: str = "calib"                    # never "test"
    windows: int = 32                       # per dataset
    seqlen: int = 512
    batch_size: int = 8
    channel_metric: str = "act_l2"          # dynamo.registry.METRICS (dynamo/analysis/metrics.py) or a plugin's
    channel_unit: ChannelUnit = ChannelUnit.row
    dynamic_channel_frac: float = 0.01      # per expert and unit: the channels that move most across datasets
    cache: bool = True                      # reuse per-dataset captures across runs (keyed, see analysis/cache.py)
    cache_dir: str = "${oc.env:DYNAMO_CACHE,'~/.cache/dynamo'}/analysis"
    figures: bool = True                    # heatmaps and bit map into the run folder (and W&B)


@dataclass
class LmEvalConfig:
    enabled: bool = True
    tasks: list[str] = field(default_factory=list)  # "suite": one rolling task per evaluated dataset
    limit: Optional[float] = None           # documents per task (int) or a fraction
    batch_size: int = 8


@dataclass
class EvalConfig:
    name: str = MISSING
    split: str = "test"
    seqlen: int = 512
    max_windows: Optional[int] = None       # per dataset; None = every full window
    reference: bool = False                 # quantized runs: also the 16-bit model's PPL, before quantizing,
                                            #   and every later pass's KL to it (dynamo/eval/fidelity.py)
    kl_topk: Optional[int] = None           # reference log-probs kept per token (on disk): None = all (vocab x 2
                                            #   bytes) up to 32,768 tokens, the top 256 above (fidelity.default_topk);
                                            #   k = the top k + the rest's mass; refused if the disk cannot hold it
    stream: Optional[list[str]] = None      # DQS runs: also serve these datasets' test windows in this order,
    stream_windows: int = 16                #   this many windows each, with the routing-shift detector on
    stream_batch_size: int = 2
    batch_size: int = 8
    datasets: Optional[list[str]] = None    # which sources to evaluate; None = all of the suite
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)


@dataclass
class CalibConfig:
    enabled: bool = False                   # quantizers turn it on; true alone records coverage
    datasets: Optional[list[str]] = None    # sources of the suite to calibrate on; None = dataset.known
    split: str = "calib"                    # never "test"
    windows: int = 32                       # per dataset
    seqlen: int = 512
    batch_size: int = 8
    min_tokens: int = 16
    policy: CoveragePolicy = CoveragePolicy.warn
    hessians: bool = True
    hessian_weighting: HessianWeighting = HessianWeighting.none
    sequential: bool = False                # layer by layer (models larger than memory)


@dataclass
class LoggerConfig:
    name: str = MISSING
    backend: LoggerBackend = LoggerBackend.none
    project: str = "dynamo"
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.offline
    tags: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    quant: QuantConfig = MISSING
    eval: EvalConfig = MISSING
    logger: LoggerConfig = MISSING
    calib: CalibConfig = field(default_factory=CalibConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    seed: int = 0
    tag: str = ""
    force: bool = False                     # recompute even when results_dir holds a record of this config
    results_dir: str = "results/runs"
    hf_home: Optional[str] = None           # where lm-eval/datasets cache; default: HF_HOME
    plugins: list[str] = field(default_factory=list)  # modules or .py files that register extensions
                                            #   (dynamo/registry.py), imported before names are checked


SCHEMAS = {"model": ModelConfig, "dataset": DatasetConfig, "quant": QuantConfig,
           "eval": EvalConfig, "logger": LoggerConfig}


def register_hydra() -> None:
    """Schemas and resolvers that conf/ refers to; call before composing a config."""
    OmegaConf.register_new_resolver("dynamo.repo", lambda rel: str(REPO_ROOT / rel), replace=True)
    OmegaConf.register_new_resolver("dynamo.suffix", lambda tag: f"_{tag}" if tag else "", replace=True)
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for group, schema in SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def to_container(cfg: Any) -> dict:
    """Plain, JSON-ready dict of a config (enums as their names)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
