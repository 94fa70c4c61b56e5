"""One table per extension point; an implementation registers itself with a decorator.

    @register_metric("act_l2", statistic="wsq")     # dynamo/analysis/metrics.py
    @register_allocation("budget", needs="significance", error_table=True, records=("target_bits",))
    @register_quantizer("gptq", plan=True, calibration=True)
    @register_policy("adaptive")
    @register_eval_task("suite")

Settings of its own. An entry may declare a dataclass of its parameters (`params=MyParams`); the user
sets them in a block of their own beside the name (quant.allocation.params, quant.switching.params,
quant.params), so a new rule with a new hyperparameter needs no edit of dynamo/config.py. The block is
checked against the dataclass with the names (a misspelt or unknown parameter, a value of the wrong
type, or a ValueError from the dataclass's __post_init__ is one UserError line), and the entry gets
the dataclass instance (`Registry.params_of(node)`; an allocation rule finds it as `layer.params`).

Why names are validated at stage entry and not by an Enum in the structured config: dynamo.config is
imported before torch and before the implementations (they import dynamo.config, so importing them
from there would be circular), and a user's plugin module (`plugins=[...]`, imported once the config
is composed) registers after any Enum would have been built. So these config fields are plain
strings; `check_names(cfg)` imports the built-in modules of each table on first use (the
`builtins` below: the only place a table names files), imports the config's plugins, and refuses an
unknown name in one line worded like Hydra's own enum error. run.py's preflight calls it for every
job of a command line (before the run folder is claimed), and the pipeline again at its start
(validate_run), so a run composed in-process is checked too.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import UserError


def parse_params(schema: type | None, given, where: str, owner: str) -> Any:
    """`given` (a mapping from the config, or None) as an instance of the entry's `schema` dataclass, or one
    UserError naming `where` (the config key of the block) and `owner` (the entry, for the message)."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    given = OmegaConf.to_container(given, resolve=True) if isinstance(given, DictConfig) else dict(given or {})
    if schema is None:
        if given:
            raise UserError(f"{where}: {owner} takes no parameters, got {', '.join(map(str, given))}")
        return None
    names = [f.name for f in fields(schema)]
    unknown = [str(k) for k in given if k not in names]
    if unknown:
        raise UserError(f"{where}.{unknown[0]}: not a parameter of {owner}; its parameters: {', '.join(names)}")
    required = [f.name for f in fields(schema) if f.default is MISSING and f.default_factory is MISSING]
    absent = [name for name in required if name not in given]
    if absent:
        raise UserError(f"{where}.{absent[0]}: {owner} needs it (no default); set {where}.{absent[0]}=...")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), given))
    except OmegaConfBaseException as err:  # a value of the wrong type: OmegaConf's first line, under our key
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{where}: {first} ({owner})") from None
    except ValueError as err:  # the dataclass's own check (__post_init__)
        raise UserError(f"{where}: {err} ({owner})") from None


def check_params_schema(schema: type | None, owner: str) -> type | None:
    if schema is not None and not (isinstance(schema, type) and is_dataclass(schema)):
        raise ValueError(f"{owner}: params must be a dataclass type, got {schema!r}")
    return schema


class Registry:
    """name -> implementation, filled by the decorator of each implementation."""

    def __init__(self, option: str, builtins: Iterable[str], params: str | None = None):
        self.option = option             # the config key that names an entry, for messages
        self.params = params             # the config key of an entry's own settings (a sibling of `option`)
        self.builtins = tuple(builtins)  # modules whose import registers the built-in entries
        self._entries: dict[str, Any] = {}
        self._order: dict[str, tuple[int, int]] = {}  # name -> (its module's place in builtins, registration)
        self._loaded = False

    def register(self, name: str, value: Any, module: str | None = None) -> Any:
        """`module`: where it is defined; built-in entries list in the order of `builtins` whatever the
        order the modules happened to be imported in, so messages are the same in every process."""
        if not name or not isinstance(name, str):
            raise ValueError(f"{self.option}: a registered name must be a non-empty string, got {name!r}")
        if self._entries.get(name, value) is not value:
            raise ValueError(f"{self.option} '{name}' is already registered ({self._entries[name]!r})")
        self._entries[name] = value
        module = module or getattr(value, "__module__", None)
        rank = self.builtins.index(module) if module in self.builtins else len(self.builtins)
        self._order.setdefault(name, (rank, len(self._order)))
        return value

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: a built-in module that asks for names while importing does not recurse
            for module in self.builtins:
                importlib.import_module(module)

    @property
    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(sorted(self._entries, key=self._order.__getitem__))

    def check(self, name) -> str:
        """The name (an enum member's value or a string), or one UserError listing the choices."""
        name = getattr(name, "value", name)
        if name not in self.names:
            raise UserError(f"{self.option}: Invalid value '{name}', expected one of [{', '.join(self.names)}]")
        return name

    def get(self, name) -> Any:
        return self._entries[self.check(name)]

    def params_of(self, node) -> Any:
        """The settings of the entry that `node` (the config node holding `option` and `params`) names, as the
        entry's dataclass (None when it declares none): checked, defaults filled in."""
        name = self.check(getattr(node, self.option.rsplit(".", 1)[1]))
        given = getattr(node, self.params.rsplit(".", 1)[1], None) if self.params else None
        return parse_params(getattr(self._entries[name], "params", None), given, self.params or self.option,
                            f"{self.option}={name}")

    def decorator(self, name: str, make: Callable[[Any], Any] = lambda obj: obj) -> Callable:
        """A decorator registering make(obj) under `name` (ranked by obj's module) and returning obj."""
        def add(obj):
            self.register(name, make(obj), obj.__module__)
            return obj
        return add


# --- significance metrics (spec Step 1) ----------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    """fn(layer: MoELayer, stats: ExpertGroupStats, unit: str) -> S_ch [n_experts, channels] of one unit
    (gate, up, down or neuron) for one dataset's routed capture. `statistic`: the channel statistic it
    reads (stats.channels[unit][statistic]); a name not in dynamo.calibration.stats.CHANNEL_STATS is
    a new statistic, accumulated only by captures for this metric (see register_statistic)."""
    name: str
    fn: Callable
    statistic: str | None = None


METRICS = Registry("analysis.channel_metric", ["dynamo.analysis.metrics"])


def register_metric(name: str, statistic: str | None = None):
    return METRICS.decorator(name, lambda fn: Metric(name, fn, statistic))


@dataclass(frozen=True)
class Statistic:
    """A per-channel running sum a metric can ask captures for: sum over routed tokens of
    transform(y) (weighted: times the token's router weight), y a unit's output (or input) value."""
    name: str
    transform: Callable                 # elementwise on a [tokens, channels] tensor
    weighted: bool = False


STATISTICS = Registry("channel statistic", ["dynamo.analysis.metrics"])


def register_statistic(name: str, weighted: bool = False):
    return STATISTICS.decorator(name, lambda transform: Statistic(name, transform, weighted))


# --- allocation rules (spec Step 2 and the baselines) --------------------------------------------

@dataclass(frozen=True)
class AllocationRule:
    """fn(layer: LayerInput, cfg: AllocationConfig) -> one width per routed expert of the layer, or None
    to keep the plan's uniform width (dynamo/quant/allocation.py runs it per MoE layer).
    needs: what the rule reads, so the run computes only that: "nothing", "routing" (routed-token
      counts of a calibration pass), or "significance" (the analysis stage's fused expert
      significance; such a rule is DynaMo's BQ, and DQS re-runs it on a new dataset's shares).
    error_table: also give it each layer's relative RTN error of every expert at every cfg.widths.
    shared_high: shared experts at cfg.high_bits (unless quant.shared_expert_bits says otherwise).
    records: the quant.allocation fields the plan's created_by records.
    check: cfg -> None, raises UserError on a setting the rule cannot use (run before any model work).
    offers: cfg -> the widths it can give a routed expert (export checks); None: cfg.widths; empty:
      none of its own, the plan's uniform width quant.bits.
    params: a dataclass of its own settings, set under quant.allocation.params and handed to fn as
      `layer.params` (module docstring: "Settings of its own")."""
    name: str
    fn: Callable
    needs: str = "nothing"
    error_table: bool = False
    shared_high: bool = False
    records: tuple[str, ...] = ()
    check: Callable | None = None
    offers: Callable | None = None
    params: type | None = None  # a dataclass of the rule's own settings (quant.allocation.params): layer.params


ALLOCATIONS = Registry("quant.allocation.method", ["dynamo.quant.allocation", "dynamo.quant.fcm", "dynamo.quant.budget"],
                       params="quant.allocation.params")
NEEDS = ("nothing", "routing", "significance")


def register_allocation(name: str, needs: str = "nothing", error_table: bool = False, shared_high: bool = False,
                        records: tuple[str, ...] = (), check: Callable | None = None, offers: Callable | None = None,
                        params: type | None = None):
    if needs not in NEEDS:
        raise ValueError(f"allocation rule '{name}': needs must be one of {', '.join(NEEDS)}, got '{needs}'")
    check_params_schema(params, f"allocation rule '{name}'")
    return ALLOCATIONS.decorator(name, lambda fn: AllocationRule(name, fn, needs, error_table, shared_high,
                                                                 tuple(records), check, offers, params))


# --- quantizers ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Quantizer:
    """plan: it applies a QuantPlan of per-expert widths (allocations and DQS work on it).
    calibration: it needs calibration windows (GPTQ's Hessians). fn: see dynamo/quant/stage.py.
    params: a dataclass of its own settings (quant.params), handed to a plan quantizer as `options.params`.
    matrix: a plan quantizer's step on one weight matrix, what apply_plan dispatches to:
      matrix(weight [out, in], hessian [in, in] or None, spec: QSpec, options) -> (QuantizedWeight,
      its loss or None; NaN: it fell back to RTN). With calibration=True, apply_plan itself gives RTN
      to a matrix without calibration signal (and lists it as a fallback)."""
    name: str
    fn: Callable | None
    plan: bool = False
    calibration: bool = False
    params: type | None = None
    matrix: Callable | None = None


QUANTIZERS = Registry("quant.method", ["dynamo.quant.stage"], params="quant.params")


def register_quantizer(name: str, plan: bool = False, calibration: bool = False, params: type | None = None,
                       matrix: Callable | None = None):
    check_params_schema(params, f"quantizer '{name}'")
    if plan and matrix is None:
        raise ValueError(f"quantizer '{name}': a plan quantizer needs its per-matrix step (matrix=...)")
    return QUANTIZERS.decorator(name, lambda fn: Quantizer(name, fn, plan, calibration, params, matrix))


# --- DQS switching policies ----------------------------------------------------------------------

SWITCH_POLICIES = Registry("quant.switching.policy", ["dynamo.switching.policies"], params="quant.switching.params")


def register_policy(name: str):
    """A class with check / prepare / quantize_errors / build (dynamo/switching/policies.py), and optionally
    `params`, a dataclass of its own settings (quant.switching.params; its steps read
    SWITCH_POLICIES.params_of(quant.switching))."""
    def add(cls):
        check_params_schema(getattr(cls, "params", None), f"switching policy '{name}'")
        return SWITCH_POLICIES.decorator(name)(cls)
    return add


# --- eval tasks we write ourselves (lm-eval's own tasks are lm-eval's registry) -------------------

EVAL_TASKS = Registry("eval.lm_eval.tasks", ["dynamo.eval.harness"])


def register_eval_task(name: str):
    """fn(documents: {dataset: evaluated documents}, workdir: Path) -> lm-eval task names it wrote
    under workdir (YAML + JSONL). A name in eval.lm_eval.tasks that is not here is an lm-eval task,
    looked up by lm-eval's TaskManager."""
    return EVAL_TASKS.decorator(name)


# --- plugins and the config check ----------------------------------------------------------------

_PLUGINS: dict[str, Any] = {}


def load_plugins(entries: Iterable[str]) -> None:
    """Import each plugin once: a module name (installed, or on PYTHONPATH; the harness never adds to
    sys.path) or a path to a .py file. Importing runs its decorators; nothing else is executed by the harness."""
    for entry in entries or ():
        entry = str(entry)
        key = str(Path(entry).expanduser().resolve()) if entry.endswith(".py") else entry  # one file, one import
        if key in _PLUGINS:
            continue
        try:
            module = _import_plugin(entry)
        except UserError:
            raise
        except Exception as err:  # the user's code: one line that says where, not a traceback
            raise UserError(f"plugins: importing {entry} failed: {type(err).__name__}: {err} "
                            f"(python -c 'import ...' on it shows the traceback)") from None
        _PLUGINS[key] = module


def _import_plugin(entry: str):
    if entry.endswith(".py"):
        path = Path(entry).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"plugins: {entry} is not a file; give a .py file or an importable module name")
        name = f"dynamo_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module
    try:
        return importlib.import_module(entry)
    except ModuleNotFoundError as err:
        if err.name and entry.startswith(err.name):
            raise UserError(f"plugins: no module named '{entry}'; give an installed module, one on PYTHONPATH, "
                            "or a path to a .py file") from None
        raise


# config key -> its table: the fields a structured config keeps as plain strings
NAMED = {"quant.method": QUANTIZERS, "quant.allocation.method": ALLOCATIONS,
         "quant.switching.policy": SWITCH_POLICIES, "analysis.channel_metric": METRICS}


def check_names(cfg) -> None:
    """Import the config's plugins, then refuse any name no table holds, and any settings block its entry
    cannot take (one UserError)."""
    from omegaconf import OmegaConf

    plugins = OmegaConf.select(cfg, "plugins", default=None) or ()
    load_plugins(plugins)
    for key, table in NAMED.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            try:
                table.check(value)
            except UserError as err:
                hint = "" if plugins else "; a plugin's name needs plugins=[its module or .py file]"
                raise UserError(f"{err}{hint}") from None
            if table.params:
                table.params_of(OmegaConf.select(cfg, key.rsplit(".", 1)[0]))
