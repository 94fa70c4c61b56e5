"""The one place that wires the stages: config -> data -> model -> [quantize] -> evaluate -> record.

Stages receive their own config node; only this module and run.py see the whole config.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from contextlib import ExitStack
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .config import (AnalysisConfig, DetectorConfig, EvalConfig, ExportFormat, SwitchingConfig, to_container)
from .data import known_datasets, load_documents, sources_of
from .devices import peak_gpu_memory_bytes
from .errors import UserError
from .eval.fidelity import ReferenceLogprobs, check_reference_disk, default_topk, reference_nbytes
from .eval.perplexity import token_perplexity
from .export import check_export, write_export
from .finite import check_weights_finite
from .fingerprint import fingerprint_inputs
from .loggers import publish
from .models import is_packed, load_model
from .offload import offload_of
from .records import provenance, write_json_atomic, write_run
from .registry import EVAL_TASKS, SWITCH_POLICIES
from .result import Evaluation, LmEval, PerplexityPass, RunResult, Switching
from .scratch import process_dir
from .tokens import RunTokens, bos_id_for
from .validate import check_required, validate_run

log = logging.getLogger(__name__)



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def selected_sources(cfg: DictConfig) -> dict:
    sources = sources_of(cfg.dataset)
    wanted = cfg.eval.datasets
    if wanted is None:
        return sources
    unknown = [name for name in wanted if name not in sources]
    if unknown:
        raise UserError(f"eval.datasets names {unknown}, not in dataset '{cfg.dataset.name}' "
                        f"(available: {sorted(sources)})")
    return {name: sources[name] for name in wanted}


def evaluate_perplexity(loaded, tokens: RunTokens, names: list[str], eval_cfg: EvalConfig,
                        before: Callable[[str], None] | None = None, reference: ReferenceLogprobs | None = None,
                        record_reference: bool = False) -> PerplexityPass:
    """PPL per dataset, its protocol, each window's mean loss (for paired comparisons of runs) and,
    with `reference`, each window's fidelity to it (the reference pass itself, `record_reference`,
    stores its log-probs there instead). `before(name)` runs before each dataset is evaluated (DQS
    switches the model there)."""
    t = time.perf_counter()
    out = PerplexityPass(ppl={}, protocol={}, window_nll={})
    for name in names:
        if before is not None:
            before(name)
        split = tokens.split(name, eval_cfg.split)
        windows = tokens.windows(name, eval_cfg.split, eval_cfg.seqlen, eval_cfg.max_windows)
        on_logprobs = None
        if reference is not None and record_reference:
            on_logprobs = reference.recorder(name, windows, loaded.model.get_output_embeddings().out_features)
        elif reference is not None:
            on_logprobs, out.fidelity[name] = reference.comparer(name, windows)
        result = token_perplexity(loaded.model, windows, eval_cfg.batch_size,
                                  available_windows=tokens.available_windows(name, eval_cfg.split, eval_cfg.seqlen),
                                  corpus_tokens=split.ids.numel(), desc=f"ppl {name}", on_logprobs=on_logprobs)
        out.ppl[name] = result.ppl
        out.window_nll[name] = result.window_nll
        out.protocol[name] = {**result.protocol(), "split": eval_cfg.split, "documents": split.documents,
                              "separator": split.separator,
                              "tokenizer": getattr(loaded.tokenizer, "name_or_path", None)}
        if tokens.bos_id is not None:  # only then: records of plain windows keep their exact content
            out.protocol[name]["bos_id"] = tokens.bos_id
        fidelity = out.fidelity.get(name)
        log.info("ppl %-12s %10.3f  (%d windows x %d tokens)%s", name, result.ppl, result.windows, result.seqlen,
                 f"  KL {fidelity.mean_kl:.5f}  top-1 {fidelity.mean_top1:.4f}" if fidelity is not None else "")
    out.seconds = time.perf_counter() - t
    return out


def evaluate_lm_eval(loaded, documents: dict, eval_cfg: EvalConfig) -> LmEval:
    """lm-eval metrics and per-question correctness (dynamo.eval.harness.LmEvalResult), with their protocol."""
    from .eval.harness import evaluate_tasks

    t = time.perf_counter()
    wanted = list(eval_cfg.lm_eval.tasks)
    ours = [t for t in wanted if t in EVAL_TASKS.names]  # tasks we write (suite, dynamo_math_mc); the rest: lm-eval's
    max_length = min(loaded.max_length, eval_cfg.seqlen)
    with tempfile.TemporaryDirectory(prefix="dynamo-lm-eval-", dir=process_dir()) as workdir:
        local = [name for t in ours for name in EVAL_TASKS.get(t)(documents, Path(workdir))]
        hub = [t for t in wanted if t not in ours]
        limit = eval_cfg.lm_eval.limit
        if limit is not None and float(limit).is_integer():
            limit = int(limit)
        result = evaluate_tasks(loaded.model, loaded.tokenizer, local + hub, Path(workdir) if local else None,
                                batch_size=eval_cfg.lm_eval.batch_size, max_length=max_length, limit=limit,
                                device=str(loaded.device))
    protocol = {"limit": eval_cfg.lm_eval.limit, "max_length": max_length, "split": eval_cfg.split}
    return LmEval(result, protocol, time.perf_counter() - t)


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> RunResult:
    """Evaluate one configuration, write its record to run_dir/result.json (records.write_run) and
    return what it produced."""
    t_start = time.perf_counter()
    check_required(cfg)
    check_switching(cfg)
    seed_everything(cfg.seed)
    if cfg.hf_home:
        os.environ["HF_HOME"] = str(Path(cfg.hf_home).expanduser())

    timings = {}
    t = time.perf_counter()
    sources = selected_sources(cfg)
    validate_run(cfg, sources)  # values, calibration files, checkpoint: before any model work
    inputs = fingerprint_inputs(cfg)  # before reading them: the record names the bytes it was computed on
    documents = {name: load_documents(src, cfg.eval.split) for name, src in sources.items()}
    timings["load_data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    loaded = load_model(cfg.model)
    timings["load_model_s"] = time.perf_counter() - t
    check_weights_finite(loaded.model, f"model {cfg.model.path}", "the checkpoint is corrupt; re-download or "
                         "re-save it")
    if is_packed(loaded.model.config) and cfg.quant.method != "none":
        raise UserError(f"{cfg.model.path} is already quantized (a packed DynaMo checkpoint); evaluate it with quant=fp16")
    # before any work: a run that cannot export fails now
    check_export(cfg.quant, cfg.model, cfg.analysis, loaded.model, sources_of(cfg.dataset), cfg.dataset.name)
    if cfg.eval.seqlen > loaded.max_length:
        raise UserError(f"eval.seqlen={cfg.eval.seqlen} is longer than {cfg.model.name} allows "
                        f"({loaded.max_length} positions); use eval.seqlen<={loaded.max_length}")
    # every split this run reads, tokenized once (the test splits' documents are already loaded)
    tokens = RunTokens(loaded.tokenizer, sources_of(cfg.dataset), bos_id_for(cfg.model, loaded.tokenizer),
                       documents={(name, cfg.eval.split): docs for name, docs in documents.items()})

    check_calibration_windows(tokens, cfg)  # a calib file too short fails now, not after the FP16 pass
    names = list(sources)
    check_vocabulary(loaded, tokens, [(name, cfg.eval.split) for name in names])
    fp16 = None
    with ExitStack() as cleanup:
        reference = None
        if cfg.eval.reference and cfg.quant.method != "none":
            # the FP16 pass also stores its log-probs (on disk) for the KL of every later pass, checked to fit first,
            # under this process's scratch folder: a later run removes it if this one is killed (dynamo/scratch.py)
            scratch = process_dir()
            reference = cleanup.enter_context(ReferenceLogprobs(reference_topk(loaded, tokens, names, cfg.eval, scratch),
                                                                root=scratch))
            t = time.perf_counter()
            fp16 = evaluate_perplexity(loaded, tokens, names, cfg.eval, reference=reference, record_reference=True)
            if cfg.eval.stream and cfg.quant.switching.enabled:
                record_stream_reference(loaded, stream_segments(tokens, cfg.eval), reference, cfg.eval.batch_size)
            timings["eval_ppl_fp16_s"] = time.perf_counter() - t

        stage = quantize_or_calibrate(loaded, tokens, cfg, run_dir)
        timings.update(stage.timings)
        evaluation = evaluate_run(loaded, tokens, names, cfg.eval, cfg.quant.switching, cfg.analysis, stage,
                                  reference=reference)
    if evaluation.bq is not None:
        timings["eval_ppl_bq_s"] = evaluation.bq.seconds
    timings["eval_ppl_s"] = evaluation.run.seconds
    if evaluation.stream_s is not None:
        timings["eval_stream_s"] = evaluation.stream_s

    lm_eval = None
    if cfg.eval.lm_eval.enabled and cfg.eval.lm_eval.tasks:
        lm_eval = evaluate_lm_eval(loaded, documents, cfg.eval)
        timings["lm_eval_s"] = lm_eval.seconds
    model = loaded.model
    model_info = {"name": cfg.model.name, "path": cfg.model.path, "class": type(model).__name__,
                  "model_type": getattr(model.config, "model_type", None),
                  "params": sum(p.numel() for p in model.parameters()), "dtype": str(loaded.dtype).removeprefix("torch."),
                  "max_length": loaded.max_length}
    if offload_of(model) is not None:
        model_info["offload"] = offload_of(model).report()
    if loaded.device.type == "cuda":  # what a user sizes a GPU by (scripts/dryrun.py reads it)
        model_info["peak_gpu_memory_bytes"] = peak_gpu_memory_bytes(model, loaded.device)  # every GPU it spans
    export = None
    if cfg.quant.export != ExportFormat.none:
        t = time.perf_counter()
        if cfg.quant.export_dataset is None:
            export = write_export(loaded, stage, cfg.quant, cfg.model, run_dir)
        else:  # DQS: export the model as switched to that dataset
            name = cfg.quant.export_dataset
            windows = sample_windows(tokens, cfg.analysis, cfg.quant.switching, name)
            with stage.switcher.switched(name, windows) as report:
                switched = {name: switch_record(stage.switcher, name, report)}
                export = write_export(loaded, stage, cfg.quant, cfg.model, run_dir)
            export["switch"] = switched
        timings["export_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    result = RunResult(run_id=run_id_of(run_dir, cfg.results_dir), config=to_container(cfg), overrides=overrides,
                       **provenance(loaded.device), model=model_info, evaluation=evaluation,
                       timings={k: round(v, 3) for k, v in timings.items()}, fp16=fp16, lm_eval=lm_eval,
                       calibration=stage.calibration, analysis=stage.analysis, quantization=stage.quantization,
                       export=export, inputs=inputs)
    hint = (f"the model's outputs overflowed or its weights are broken (model.dtype={cfg.model.dtype}; "
            "try model.dtype=float32); nothing was recorded")
    record = write_run(result, run_dir, hint)
    publish_finished(record, cfg, run_dir)
    return result


def publish_finished(record: dict, cfg: DictConfig, run_dir: Path) -> None:
    """Mirror the written record to the tracker. The record is the result: a tracker failure now (no
    network, an unwritable home, WANDB_MODE= empty) is a warning in the log and the record, not a
    failed run."""
    try:
        publish(record, cfg.logger, run_dir)
    except Exception as err:  # noqa: BLE001  (any tracker error; the run's result is already safe)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        warning = f"logging to {cfg.logger.backend.value} failed after the record was written: " \
                  f"{type(err).__name__}: {first}"
        log.warning("%s; the record is complete (%s)", warning, Path(run_dir) / "result.json")
        record["warnings"] = [*record.get("warnings", []), warning]
        try:
            write_json_atomic(Path(run_dir) / "result.json", record)  # this run's own record, same content + warning
        except OSError as write_err:
            log.warning("could not add the warning to the record: %s", write_err)


@dataclass
class QuantStage:
    """What the quantization stage hands to evaluation, to the export and to the record."""

    calibration: dict | None = None
    quantization: dict | None = None
    analysis: dict | None = None
    switcher: object | None = None   # a dynamo.switching.base.Switcher (the policy's) when DQS is on
    cache_s: float = 0.0             # the DQS policy's preparation on the FP16 model (cache or master copy)
    timings: dict[str, float] = field(default_factory=dict)  # analysis_s, quantize_s or calibration_s
    codes: InitVar[dict | None] = None  # the quantizer's integer codes, kept for quant.export=packed

    def __post_init__(self, codes: dict | None) -> None:
        self._codes = codes

    def take_codes(self) -> dict | None:
        """The codes, handed over once: the stage keeps no reference, so they are freed once packed."""
        codes, self._codes = self._codes, None
        return codes

    def switching_summary(self) -> dict:
        return {**self.switcher.summary(), "prepare_s": round(self.cache_s, 3)}


def evaluate_run(loaded, tokens: RunTokens, names: list[str], eval_cfg: EvalConfig, switching: SwitchingConfig,
                 analysis: AnalysisConfig, stage: QuantStage, reference: ReferenceLogprobs | None = None
                 ) -> Evaluation:
    """The run's PPL (and, with `reference`, its KL to FP16); with DQS, BQ alone first (metrics.ppl_bq,
    metrics.kl_bq), then BQ + DQS switched to each dataset's calib split before it is evaluated, then
    the stream if eval.stream asks for it."""
    switcher = stage.switcher
    if switcher is None:
        return Evaluation(run=evaluate_perplexity(loaded, tokens, names, eval_cfg, reference=reference))
    bq = evaluate_perplexity(loaded, tokens, names, eval_cfg, before=lambda name: switcher.restore_bq(),
                             reference=reference)
    switches = {}

    def switch(name: str) -> None:
        switches[name] = switch_step(switcher, tokens, analysis, switching, name)

    with switcher.restored():  # lm-eval and anything after see BQ
        run_pass = evaluate_perplexity(loaded, tokens, names, eval_cfg, before=switch, reference=reference)
    evaluation = Evaluation(run=run_pass, bq=bq, switching=Switching(switches, stage.switching_summary()))
    if eval_cfg.stream:
        t = time.perf_counter()
        with switcher.restored():
            evaluation.stream = evaluate_stream(loaded, tokens, eval_cfg, switching.detector, switcher, reference)
        evaluation.stream_s = time.perf_counter() - t
    return evaluation


def sample_windows(tokens: RunTokens, analysis: AnalysisConfig, switching: SwitchingConfig, name: str) -> torch.Tensor:
    """The windows a switch to `name` profiles: quant.switching.sample_windows of its calib split (never test)."""
    from .calibration.stage import calibration_windows

    sample = OmegaConf.merge(analysis, {"windows": switching.sample_windows})
    return calibration_windows(tokens, [name], sample, node="analysis")[name]


def switch_step(switcher, tokens: RunTokens, analysis: AnalysisConfig, switching: SwitchingConfig,
                name: str) -> dict:
    """DQS before evaluating `name` (the model stays switched until the caller's `restored()` block ends);
    returns the switch's report as the record keeps it."""
    report = switcher.switch_for(name, sample_windows(tokens, analysis, switching, name))
    return switch_record(switcher, name, report)


def switch_record(switcher, name: str, report) -> dict:
    """Keep the switched state under `name` (the adaptive policy's slot sets) and the report as the record
    keeps it (without the per-layer shares and the top slots, which only the log needs)."""
    switcher.remember(name)
    summary = report.to_dict()
    summary.pop("shares", None)
    summary.pop("top", None)
    log.info("DQS %-12s %d expert(s) changed, %.1f ms (profile %.1f ms), exact bits %.3f", name,
             report.experts_changed, 1e3 * report.total_s, 1e3 * report.profile_s, report.exact_bits)
    return summary


def stream_segments(tokens: RunTokens, eval_cfg: EvalConfig) -> list[tuple[str, torch.Tensor]]:
    """eval.stream's (dataset, windows): test windows evenly spaced over each split, so a segment is
    the dataset, not its first few documents."""
    segments = []
    for name in eval_cfg.stream:
        windows = tokens.windows(name, eval_cfg.split, eval_cfg.seqlen)
        pick = torch.linspace(0, len(windows) - 1, min(eval_cfg.stream_windows, len(windows))).round().long()
        segments.append((name, windows[pick]))
    return segments


def reference_topk(loaded, tokens: RunTokens, names: list[str], eval_cfg: EvalConfig,
                   folder: Path | None = None) -> int | None:
    """eval.kl_topk as applied (unset: top-k above FULL_VOCAB_MAX tokens), once the reference's disk bytes
    (every dataset's windows and the stream's) are known to fit in `folder` (default: the temporary folder)."""
    vocab = loaded.model.get_output_embeddings().out_features
    topk = default_topk(eval_cfg.kl_topk, vocab)
    shapes = {name: tuple(tokens.windows(name, eval_cfg.split, eval_cfg.seqlen, eval_cfg.max_windows).shape)
              for name in names}
    if eval_cfg.stream:
        shapes.update({f"stream/{k}": tuple(w.shape) for k, (_, w) in enumerate(stream_segments(tokens, eval_cfg))})
    needed = reference_nbytes(shapes, vocab, topk)
    check_reference_disk(needed, folder, topk, vocab)
    if topk != eval_cfg.kl_topk:
        log.info("KL reference: the top %d of %d log-probs per token (eval.kl_topk unset, a big vocabulary), "
                 "%.1f MB on disk", topk, vocab, needed / 1e6)
    return topk


def record_stream_reference(loaded, segments: list, reference: ReferenceLogprobs, batch_size: int) -> None:
    """The FP16 model's log-probs of the stream's windows, for its KL before and after each switch."""
    vocab = loaded.model.get_output_embeddings().out_features
    for k, (name, windows) in enumerate(segments):
        token_perplexity(loaded.model, windows, batch_size, desc=f"stream reference {name}",
                         on_logprobs=reference.recorder(f"stream/{k}", windows, vocab))


def evaluate_stream(loaded, tokens: RunTokens, eval_cfg: EvalConfig, d: DetectorConfig, switcher,
                    reference: ReferenceLogprobs | None = None) -> dict:
    """Serve eval.stream's datasets one after another; the detector (`d`) decides when DQS switches.
    With `reference`, each segment also reports its KL to FP16 before and after its first switch."""
    from .switching import RoutingShiftDetector, run_stream

    segments = stream_segments(tokens, eval_cfg)
    meters = [reference.comparer(f"stream/{k}", w) for k, (_, w) in enumerate(segments)] if reference else None
    detector = RoutingShiftDetector(window=d.window, threshold=d.threshold, patience=d.patience, cooldown=d.cooldown)
    report = run_stream(loaded.model, segments, detector, switcher, batch_size=eval_cfg.stream_batch_size,
                        on_logits=(lambda s, start, logits: meters[s][0](
                            start, torch.log_softmax(logits[:, :-1].float(), dim=-1))) if meters else None)
    out = report.to_dict()
    for k, segment in enumerate(report.segments):
        kl = ""
        if meters:
            per_window = meters[k][1].kl
            seg = out["segments"][k]
            seg["kl"] = float(np.mean(per_window))
            seg["window_kl"] = per_window
            if segment.switches:  # the switch applies from the batch after the one that fired
                cut = (segment.switches[0] - segment.first_batch + 1) * eval_cfg.stream_batch_size
                seg["kl_before_switch"] = float(np.mean(per_window[:cut]))
                seg["kl_after_switch"] = float(np.mean(per_window[cut:])) if cut < len(per_window) else None
                kl = f"  KL {seg['kl_before_switch']:.5f} -> {seg['kl_after_switch'] or float('nan'):.5f}"
            else:
                kl = f"  KL {seg['kl']:.5f}"
        log.info("stream %-12s batches %3d-%3d  ppl %9.3f  switches at %s%s", segment.dataset, segment.first_batch,
                 segment.first_batch + segment.batches - 1, segment.ppl, segment.switches or "-", kl)
    log.info("stream: %d switch(es), %.1f%% of the online time (serving %.2f s, switching %.2f s; the paper: "
             "7.7-10.7%%)", len(report.events), 100 * report.switch_share, report.serve_s, report.switch_s)
    for event in out["events"]:  # keep the record readable: the switch's widths live in the run log
        if event["switch"] is not None:
            event["switch"] = {k: event["switch"][k] for k in ("experts_changed", "total_s", "exact_bits")}
    return out


def check_calibration_windows(tokens: RunTokens, cfg: DictConfig) -> None:
    """Build the calibration and analysis windows the run's method will need (cheap: the splits are
    tokenized once), so a calib file shorter than one window is refused before any model work."""
    from .calibration.stage import all_calibration_windows, calibration_windows
    from .quant.allocation import rule_of
    from .quant.stage import needs_analysis
    from .registry import QUANTIZERS

    known = known_datasets(cfg.dataset)
    quantizer = QUANTIZERS.get(cfg.quant.method)
    routing = quantizer.plan and not cfg.quant.plan and rule_of(cfg.quant.allocation).needs == "routing"
    if cfg.calib.enabled or quantizer.calibration or routing:
        all_calibration_windows(tokens, known, cfg.calib)
    if quantizer.name != "none" and needs_analysis(cfg.quant):
        from .analysis import analysis_datasets

        calibration_windows(tokens, analysis_datasets(cfg.analysis, known), cfg.analysis, node="analysis")


def check_vocabulary(loaded, tokens: RunTokens, splits: list[tuple[str, str]]) -> None:
    """Token ids must index the model's embedding: a tokenizer from another model (a packed reload
    saved with the wrong one) gives ids beyond it, an index error deep in the forward pass or, on
    some devices, silently wrong rows."""
    embeddings = loaded.model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        return
    checked = [*splits, *[key for key in tokens.tokenized() if key not in splits]]  # + the calibration splits
    for name, split in checked:
        ids = tokens.split(name, split).ids
        top = int(ids.max()) if ids.numel() else -1
        if top >= rows:
            raise UserError(f"{name} [{split}]: the tokenizer gives token id {top}, but the model's vocabulary has "
                            f"{rows} rows; the tokenizer is not this model's (save the model with its own "
                            "tokenizer, or point model.path at a folder holding both)")
    if tokens.bos_id is not None and tokens.bos_id >= rows:
        raise UserError(f"the BOS token id {tokens.bos_id} is beyond the model's vocabulary of {rows}; "
                        "the tokenizer is not this model's")


def check_switching(cfg: DictConfig) -> None:
    """Refuse a DQS configuration that cannot work, before anything runs."""
    sw = cfg.quant.switching
    if cfg.eval.stream and not sw.enabled:
        raise UserError("eval.stream serves datasets through DQS: use a DynaMo quant with switching "
                        "(e.g. quant=dynamo_3bit)")
    if cfg.eval.stream:
        unknown = [n for n in cfg.eval.stream if n not in selected_sources(cfg)]
        if unknown:
            raise UserError(f"eval.stream names {unknown}, not among the evaluated datasets")
    if not sw.enabled:
        return
    from .quant.stage import needs_analysis

    if cfg.quant.method == "none":  # a packed checkpoint that carries its slot sets switches with them
        saved_slot_sets(cfg.model)
        return
    if not needs_analysis(cfg.quant):
        raise UserError("quant.switching.enabled=true needs a DynaMo allocation (a quant.allocation.method that "
                        "needs significance: fcm, budget) and no quant.plan file")
    if sw.sample_windows < 1:
        raise UserError(f"quant.switching.sample_windows must be >= 1, got {sw.sample_windows}")
    SWITCH_POLICIES.get(sw.policy).check(cfg.quant, cfg.analysis)  # the policy's own settings


def quantize_or_calibrate(loaded, tokens: RunTokens, cfg: DictConfig, run_dir: Path) -> QuantStage:
    """The quantization stage (after DynaMo's analysis when its allocation needs it, with the FP16
    channel cache when DQS is on, and with the calibration its method needs), or calibration alone."""
    known = known_datasets(cfg.dataset)
    if cfg.quant.method == "none" and cfg.quant.switching.enabled:
        return packed_switching_stage(loaded, cfg)
    if cfg.quant.method == "none":
        if not cfg.calib.enabled:
            return QuantStage()
        from .calibration.stage import calibrate

        t = time.perf_counter()
        stats = calibrate(loaded.model, tokens, known, cfg.calib)
        return QuantStage(calibration=report_coverage(stats, list(cfg.calib.datasets or known), run_dir),
                          timings={"calibration_s": time.perf_counter() - t})

    from .quant.stage import needs_analysis, quantize

    timings, significance, analysis, policy, prepared, cache_s = {}, None, None, None, None, 0.0
    if needs_analysis(cfg.quant):
        significance, analysis, timings["analysis_s"] = run_analysis(loaded, tokens, cfg, run_dir)
        if cfg.quant.switching.enabled:  # what a switch restores from, taken before quantizing
            policy = SWITCH_POLICIES.get(cfg.quant.switching.policy)
            t = time.perf_counter()
            prepared = policy.prepare(loaded.model, cfg.quant, cfg.analysis, significance, run_dir)
            cache_s = time.perf_counter() - t
    t = time.perf_counter()
    result = quantize(loaded.model, tokens, known, cfg.quant, cfg.calib, cfg.model.name, significance=significance,
                      errors=policy.quantize_errors(prepared) if policy is not None else None)
    timings["quantize_s"] = time.perf_counter() - t
    check_weights_finite(loaded.model, "after quantization", "raise quant.damp (e.g. quant.damp=0.1) "
                         "or try quant.method=rtn on this model")
    if result.plan is not None:
        result.plan.save(run_dir / "plan.json")
    if analysis is not None:
        # the paper's overhead: analysis as a share of the offline stage (analysis + quantization);
        # with a cache hit, the share uses the seconds the cached captures took when computed
        offline = analysis["capture_s"] + timings["quantize_s"]
        analysis["share_of_offline"] = round(analysis["capture_s"] / offline, 4) if offline else None
        write_dynamo_figures(cfg.analysis, run_dir, significance, result.plan)
    switcher = None
    if policy is not None:
        switcher = policy.build(loaded.model, result.plan, significance, prepared, cfg.quant, cfg.analysis)
    calibration = None
    if result.stats is not None:
        calibration = report_coverage(result.stats, list(cfg.calib.datasets or known), run_dir)
    return QuantStage(calibration=calibration, quantization=result.summary, analysis=analysis, switcher=switcher,
                      cache_s=cache_s, timings=timings, codes=result.codes)


def saved_slot_sets(model_cfg) -> Path:
    """The slot_sets/ folder of a packed checkpoint (quant=packed_dqs), or one error line saying what is missing."""
    folder = Path(str(model_cfg.path)) / "slot_sets"
    if not (folder / "index.json").is_file():
        raise UserError(f"quant.switching.enabled=true without quantizing (quant.method=none) serves a packed checkpoint's "
                        f"saved slot sets; {model_cfg.path} has no slot_sets/index.json (export a DynaMo run with "
                        f"quant.export=packed, or use quant=dynamo_3bit)")
    return folder


def packed_switching_stage(loaded, cfg: DictConfig) -> QuantStage:
    """quant=packed_dqs: the adaptive switcher of a reloaded packed model, from its saved slot sets; a switch to a
    dataset without a saved set (and the stream's detector-driven switches) profile new windows, reading the FP16
    experts by slice from the checkpoint the export names (`master` in slot_sets/index.json)."""
    from .switching.adaptive import AdaptiveSwitcher
    from .switching.master import DiskMaster
    from .switching.slotset import saved_entry

    folder = saved_slot_sets(cfg.model)
    if not is_packed(loaded.model.config):
        raise UserError(f"quant=packed_dqs serves a packed checkpoint; {cfg.model.path} is not one")
    hint = saved_entry(folder).get("master")
    master = DiskMaster(hint, loaded.model) if hint and Path(hint).is_dir() else None
    if master is None and cfg.eval.stream:
        raise UserError(f"eval.stream switches to new windows, which needs the FP16 checkpoint the slot sets were made "
                        f"from ({hint or 'not recorded'} is not a local folder)")
    t = time.perf_counter()
    switcher = AdaptiveSwitcher.for_saved_sets(loaded.model, folder, master, batch_size=cfg.analysis.batch_size)
    return QuantStage(switcher=switcher, cache_s=time.perf_counter() - t)


def run_analysis(loaded, tokens: RunTokens, cfg: DictConfig, run_dir: Path):
    """DynaMo Step 1 on the FP16 model; the significance artifact lands in the run folder.
    Returns (Significance, the record's "analysis" block, seconds)."""
    from .analysis import analysis_datasets, analyze

    t = time.perf_counter()
    significance, report = analyze(loaded.model, tokens, analysis_datasets(cfg.analysis, known_datasets(cfg.dataset)),
                                   cfg.analysis, model_path=cfg.model.path, revision=cfg.model.revision, seed=cfg.seed)
    seconds = time.perf_counter() - t
    significance.save(run_dir / "significance")
    return significance, {**report, **significance.summary(), "artifact": "significance.safetensors"}, seconds


def write_dynamo_figures(analysis: AnalysisConfig, run_dir: Path, significance, plan) -> None:
    if not analysis.figures:
        return
    from .analysis.figures import write_figures

    experts = {i: len(t) for i, t in significance.tokens[significance.datasets[0]].items()}
    write_figures(run_dir, significance, {i: [plan.spec_for(i, e, "gate").bits for e in range(n)]
                                          for i, n in experts.items()})


def report_coverage(stats, datasets: list[str], run_dir: Path) -> dict:
    """Print and save the per-(layer, expert) coverage table of a calibration."""
    from .calibration import coverage_summary, coverage_table

    summary = coverage_summary(stats)
    table = coverage_table(stats)
    print(table)
    (run_dir / "coverage.txt").write_text(table + "\n")
    write_json_atomic(run_dir / "coverage.json", summary)
    return {"datasets": datasets, **summary}


def run_id_of(run_dir: Path, results_dir: str) -> str:
    try:
        return str(Path(run_dir).resolve().relative_to(Path(results_dir).resolve()))
    except ValueError:
        return Path(run_dir).name
