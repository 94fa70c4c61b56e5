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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .config import ExportFormat, to_container
from .data import known_datasets, load_documents, sources_of
from .errors import UserError
from .eval.fidelity import ReferenceLogprobs
from .eval.perplexity import make_windows, token_perplexity, tokenize_corpus
from .export import check_export, write_export
from .finite import check_finite, check_weights_finite
from .loggers import publish
from .models import is_packed, load_model
from .records import MC_CORRECT_FILE, RESULT_FILE, WINDOW_FILES, make_record, write_json_atomic
from .registry import EVAL_TASKS, SWITCH_POLICIES
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


def evaluate_perplexity(loaded, documents: dict, sources: dict, eval_cfg,
                        before: Callable[[str], None] | None = None, reference: ReferenceLogprobs | None = None,
                        record_reference: bool = False) -> tuple[dict, dict, dict, dict]:
    """PPL per dataset, its protocol, each window's mean loss (for paired comparisons of runs) and,
    with `reference`, each window's fidelity to it (dataset -> WindowFidelity; the reference pass
    itself, `record_reference`, stores its log-probs there instead).
    `before(name)` runs before each dataset is evaluated (DQS switches the model there)."""
    ppl, protocol, window_nll, fidelity = {}, {}, {}, {}
    for name, docs in documents.items():
        if before is not None:
            before(name)
        ids = tokenize_corpus(loaded.tokenizer, docs, sources[name].separator)
        windows = make_windows(ids, eval_cfg.seqlen, eval_cfg.max_windows, name)
        on_logprobs = None
        if reference is not None and record_reference:
            on_logprobs = reference.recorder(name, windows, loaded.model.get_output_embeddings().out_features)
        elif reference is not None:
            on_logprobs, fidelity[name] = reference.comparer(name, windows)
        result = token_perplexity(loaded.model, windows, eval_cfg.batch_size,
                                  available_windows=ids.numel() // eval_cfg.seqlen, corpus_tokens=ids.numel(),
                                  desc=f"ppl {name}", on_logprobs=on_logprobs)
        ppl[name] = result.ppl
        window_nll[name] = result.window_nll
        protocol[name] = {**result.protocol(), "split": eval_cfg.split, "documents": len(docs),
                          "separator": sources[name].separator,
                          "tokenizer": getattr(loaded.tokenizer, "name_or_path", None)}
        log.info("ppl %-12s %10.3f  (%d windows x %d tokens)%s", name, result.ppl, result.windows, result.seqlen,
                 f"  KL {fidelity[name].mean_kl:.5f}  top-1 {fidelity[name].mean_top1:.4f}" if name in fidelity else "")
    return ppl, protocol, window_nll, fidelity


def record_fidelity(metrics: dict, window_kl: dict, fidelity: dict, key: str, suffix: str = "") -> None:
    """metrics.kl<suffix> / metrics.top1_agree<suffix> per dataset, and the per-window KL for window_kl*.json."""
    if not fidelity:
        return
    metrics[f"kl{suffix}"] = {name: f.mean_kl for name, f in fidelity.items()}
    metrics[f"top1_agree{suffix}"] = {name: f.mean_top1 for name, f in fidelity.items()}
    window_kl[key] = {name: f.kl for name, f in fidelity.items()}


def evaluate_lm_eval(loaded, documents: dict, eval_cfg):
    """lm-eval metrics and per-question correctness (dynamo.eval.harness.LmEvalResult)."""
    from .eval.harness import evaluate_tasks

    wanted = list(eval_cfg.lm_eval.tasks)
    ours = [t for t in wanted if t in EVAL_TASKS.names]  # tasks we write (suite, dynamo_math_mc); the rest: lm-eval's
    with tempfile.TemporaryDirectory(prefix="dynamo-lm-eval-") as workdir:
        local = [name for t in ours for name in EVAL_TASKS.get(t)(documents, Path(workdir))]
        hub = [t for t in wanted if t not in ours]
        limit = eval_cfg.lm_eval.limit
        if limit is not None and float(limit).is_integer():
            limit = int(limit)
        return evaluate_tasks(loaded.model, loaded.tokenizer, local + hub, Path(workdir) if local else None,
                              batch_size=eval_cfg.lm_eval.batch_size,
                              max_length=min(loaded.max_length, eval_cfg.seqlen), limit=limit, device=str(loaded.device))


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict:
    """Evaluate one configuration and write its record to run_dir/result.json."""
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
    documents = {name: load_documents(src, cfg.eval.split) for name, src in sources.items()}
    timings["load_data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    loaded = load_model(cfg.model)
    timings["load_model_s"] = time.perf_counter() - t
    check_weights_finite(loaded.model, f"model {cfg.model.path}", "the checkpoint is corrupt; re-download or "
                         "re-save it")
    if is_packed(loaded.model.config) and cfg.quant.method != "none":
        raise UserError(f"{cfg.model.path} is already quantized (a packed DynaMo checkpoint); evaluate it with quant=fp16")
    check_export(cfg, loaded.model, sources_of(cfg.dataset))  # before any work: a run that cannot export fails now
    if cfg.eval.seqlen > loaded.max_length:
        raise UserError(f"eval.seqlen={cfg.eval.seqlen} is longer than {cfg.model.name} allows "
                        f"({loaded.max_length} positions); use eval.seqlen<={loaded.max_length}")

    metrics, window_nll, window_kl = {}, {}, {}
    with ExitStack() as cleanup:
        reference = None
        if cfg.eval.reference and cfg.quant.method != "none":
            # the FP16 pass also stores its log-probs (on disk) for the KL of every later pass
            reference = cleanup.enter_context(ReferenceLogprobs(cfg.eval.kl_topk))
            t = time.perf_counter()
            metrics["ppl_fp16"], _, window_nll["fp16"], _ = evaluate_perplexity(
                loaded, documents, sources, cfg.eval, reference=reference, record_reference=True)
            if cfg.eval.stream and cfg.quant.switching.enabled:
                record_stream_reference(loaded, stream_segments(loaded, documents, sources, cfg), reference,
                                        cfg.eval.batch_size)
            timings["eval_ppl_fp16_s"] = time.perf_counter() - t

        stage = quantize_or_calibrate(loaded, cfg, run_dir, timings)
        calibration, quantization, analysis = stage.calibration, stage.quantization, stage.analysis

        ppl, ppl_protocol, switching = evaluate_run(loaded, documents, sources, cfg, stage, metrics, window_nll,
                                                    timings, reference=reference, window_kl=window_kl)
    metrics = {"ppl": ppl, **metrics}
    protocol = {"ppl": ppl_protocol}
    if quantization is not None:
        bits = quantization["bits"]
        metrics["avg_bits"] = {"experts": bits["experts"], "all": bits["all"],
                               "experts_codes_only": bits["experts_codes_only"]}

    if cfg.eval.lm_eval.enabled and cfg.eval.lm_eval.tasks:
        t = time.perf_counter()
        lm_eval = evaluate_lm_eval(loaded, documents, cfg.eval)
        metrics["lm_eval"] = lm_eval.metrics
        if lm_eval.per_question:  # for paired accuracy intervals (dynamo.stats.accuracy_difference)
            write_json_atomic(run_dir / MC_CORRECT_FILE, lm_eval.per_question)
        timings["lm_eval_s"] = time.perf_counter() - t
        protocol["lm_eval"] = {"limit": cfg.eval.lm_eval.limit, "max_length": min(loaded.max_length, cfg.eval.seqlen),
                               "split": cfg.eval.split}
    model = loaded.model
    model_info = {"name": cfg.model.name, "path": cfg.model.path, "class": type(model).__name__,
                  "model_type": getattr(model.config, "model_type", None),
                  "params": sum(p.numel() for p in model.parameters()), "dtype": str(loaded.dtype).removeprefix("torch."),
                  "max_length": loaded.max_length}
    export = None
    if cfg.quant.export != ExportFormat.none:
        t = time.perf_counter()
        switched = {}
        if cfg.quant.export_dataset is not None:  # DQS: export the model as switched to that dataset
            switch_before_eval(stage.switcher, loaded.tokenizer, cfg, sources_of(cfg.dataset), switched,
                               cfg.quant.export_dataset)
        export = write_export(loaded, stage, cfg, run_dir) | ({"switch": switched} if switched else {})
        timings["export_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    timings = {k: round(v, 3) for k, v in timings.items()}
    record = make_record(run_id=run_id_of(run_dir, cfg.results_dir), config=to_container(cfg), overrides=overrides,
                         device=loaded.device, model_info=model_info, metrics=metrics, protocol=protocol,
                         timings=timings)
    if calibration is not None:
        record["calibration"] = calibration
    if analysis is not None:
        record["analysis"] = analysis
    if switching is not None:
        record["switching"] = switching
    if quantization is not None:
        record["quantization"] = quantization
    if export is not None:
        record["export"] = export
    hint = (f"the model's outputs overflowed or its weights are broken (model.dtype={cfg.model.dtype}; "
            "try model.dtype=float32); nothing was recorded")
    check_finite(record, "the run's record", hint)
    check_finite(window_nll, "the per-window losses", hint)
    check_finite(window_kl, "the per-window KL", hint)
    for key, name in (("run", "ppl"), ("fp16", "ppl_fp16"), ("bq", "ppl_bq")):
        if key in window_nll:
            write_json_atomic(run_dir / WINDOW_FILES[name], window_nll[key])
    for key, name in (("run", "kl"), ("bq", "kl_bq")):
        if key in window_kl:
            write_json_atomic(run_dir / WINDOW_FILES[name], window_kl[key])
    write_json_atomic(run_dir / RESULT_FILE, record)
    publish(record, cfg.logger, run_dir)
    return record


@dataclass
class QuantStage:
    """What the quantization stage hands to evaluation and to the record."""

    calibration: dict | None = None
    quantization: dict | None = None
    analysis: dict | None = None
    switcher: object | None = None   # dynamo.switching.DynamicSwitcher when DQS is on
    codes: dict | None = None        # the quantizer's integer codes, kept for quant.export=packed
    cache_s: float = 0.0             # the DQS policy's preparation on the FP16 model (cache or master copy)

    def switching_summary(self) -> dict:
        return {**self.switcher.summary(), "prepare_s": round(self.cache_s, 3)}


def evaluate_run(loaded, documents: dict, sources: dict, cfg: DictConfig, stage: QuantStage, metrics: dict,
                 window_nll: dict, timings: dict, reference: ReferenceLogprobs | None = None,
                 window_kl: dict | None = None) -> tuple[dict, dict, dict | None]:
    """The run's PPL (and, with `reference`, its KL to FP16); with DQS, BQ alone first (metrics.ppl_bq,
    metrics.kl_bq), then BQ + DQS switched to each dataset's calib split before it is evaluated, then
    the stream if eval.stream asks for it."""
    switcher, switching, before = stage.switcher, None, None
    window_kl = {} if window_kl is None else window_kl
    if switcher is not None:
        t = time.perf_counter()
        metrics["ppl_bq"], _, window_nll["bq"], fidelity = evaluate_perplexity(
            loaded, documents, sources, cfg.eval, before=lambda name: switcher.restore_bq(), reference=reference)
        record_fidelity(metrics, window_kl, fidelity, "bq", "_bq")
        timings["eval_ppl_bq_s"] = time.perf_counter() - t
        switching = {"switches": {}}
        before = partial(switch_before_eval, switcher, loaded.tokenizer, cfg, sources, switching["switches"])
    t = time.perf_counter()
    ppl, protocol, window_nll["run"], fidelity = evaluate_perplexity(loaded, documents, sources, cfg.eval,
                                                                     before=before, reference=reference)
    record_fidelity(metrics, window_kl, fidelity, "run")
    timings["eval_ppl_s"] = time.perf_counter() - t
    if switcher is not None:
        switcher.restore_bq()  # lm-eval and anything after see BQ
        switching.update(stage.switching_summary())
        if cfg.eval.stream:
            t = time.perf_counter()
            metrics["stream"] = evaluate_stream(loaded, documents, sources, cfg, switcher, reference)
            switcher.restore_bq()
            timings["eval_stream_s"] = time.perf_counter() - t
    return ppl, protocol, switching


def switch_before_eval(switcher, tokenizer, cfg: DictConfig, sources: dict, reports: dict, name: str) -> None:
    """DQS before evaluating `name`: profile its calib split (never test) and switch to it."""
    from .calibration.stage import calibration_windows

    sample = OmegaConf.merge(cfg.analysis, {"windows": cfg.quant.switching.sample_windows})
    windows = calibration_windows(tokenizer, sources, [name], sample, node="analysis")[name]
    report = switcher.switch_to(windows)
    summary = report.to_dict()
    summary.pop("shares", None)
    reports[name] = summary
    summary.pop("top", None)
    log.info("DQS %-12s %d expert(s) changed, %.1f ms (profile %.1f ms), exact bits %.3f", name,
             report.experts_changed, 1e3 * report.total_s, 1e3 * report.profile_s, report.exact_bits)


def stream_segments(loaded, documents: dict, sources: dict, cfg: DictConfig) -> list[tuple[str, torch.Tensor]]:
    """eval.stream's (dataset, windows): test windows evenly spaced over each split, so a segment is
    the dataset, not its first few documents."""
    segments = []
    for name in cfg.eval.stream:
        ids = tokenize_corpus(loaded.tokenizer, documents[name], sources[name].separator)
        windows = make_windows(ids, cfg.eval.seqlen, None, name)
        pick = torch.linspace(0, len(windows) - 1, min(cfg.eval.stream_windows, len(windows))).round().long()
        segments.append((name, windows[pick]))
    return segments


def record_stream_reference(loaded, segments: list, reference: ReferenceLogprobs, batch_size: int) -> None:
    """The FP16 model's log-probs of the stream's windows, for its KL before and after each switch."""
    vocab = loaded.model.get_output_embeddings().out_features
    for k, (name, windows) in enumerate(segments):
        token_perplexity(loaded.model, windows, batch_size, desc=f"stream reference {name}",
                         on_logprobs=reference.recorder(f"stream/{k}", windows, vocab))


def evaluate_stream(loaded, documents: dict, sources: dict, cfg: DictConfig, switcher,
                    reference: ReferenceLogprobs | None = None) -> dict:
    """Serve eval.stream's datasets one after another; the detector decides when DQS switches.
    With `reference`, each segment also reports its KL to FP16 before and after its first switch."""
    from .switching import RoutingShiftDetector, run_stream

    segments = stream_segments(loaded, documents, sources, cfg)
    meters = [reference.comparer(f"stream/{k}", w) for k, (_, w) in enumerate(segments)] if reference else None
    d = cfg.quant.switching.detector
    detector = RoutingShiftDetector(window=d.window, threshold=d.threshold, patience=d.patience, cooldown=d.cooldown)
    report = run_stream(loaded.model, segments, detector, switcher, batch_size=cfg.eval.stream_batch_size,
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
                cut = (segment.switches[0] - segment.first_batch + 1) * cfg.eval.stream_batch_size
                seg["kl_before_switch"] = float(np.mean(per_window[:cut]))
                seg["kl_after_switch"] = float(np.mean(per_window[cut:])) if cut < len(per_window) else None
                kl = f"  KL {seg['kl_before_switch']:.5f} -> {seg['kl_after_switch'] or float('nan'):.5f}"
            else:
                kl = f"  KL {seg['kl']:.5f}"
        log.info("stream %-12s batches %3d-%3d  ppl %9.3f  switches at %s%s", segment.dataset, segment.first_batch,
                 segment.first_batch + segment.batches - 1, segment.ppl, segment.switches or "-", kl)
    for event in out["events"]:  # keep the record readable: the switch's widths live in the run log
        if event["switch"] is not None:
            event["switch"] = {k: event["switch"][k] for k in ("experts_changed", "total_s", "exact_bits")}
    return out


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

    if not needs_analysis(cfg.quant):
        raise UserError("quant.switching.enabled=true needs a DynaMo allocation (a quant.allocation.method that "
                        "needs significance: fcm, budget) and no quant.plan file")
    if sw.policy == "paper" and sw.channel_mode.value == "requant" and cfg.analysis.channel_unit.value == "neuron":
        raise UserError("quant.switching.channel_mode=requant needs analysis.channel_unit=row (a neuron's down "
                        "column shares its quantization groups); use channel_mode=fp16")
    if not 0.0 < sw.budget_frac < 1.0:
        raise UserError(f"quant.switching.budget_frac must be in (0, 1) (a share of the routed experts' FP16 bytes), "
                        f"got {sw.budget_frac}")
    if not 0.0 <= sw.mix <= 1.0 or sw.sample_windows < 1:
        raise UserError(f"quant.switching: mix must be in [0, 1] and sample_windows >= 1, got mix={sw.mix}, "
                        f"sample_windows={sw.sample_windows}")


def quantize_or_calibrate(loaded, cfg: DictConfig, run_dir: Path, timings: dict) -> QuantStage:
    """The quantization stage (after DynaMo's analysis when its allocation needs it, with the FP16
    channel cache when DQS is on, and with the calibration its method needs), or calibration alone."""
    stage, stats = QuantStage(), None
    known = known_datasets(cfg.dataset)
    if cfg.quant.method != "none":
        from .quant.stage import needs_analysis, quantize

        significance, policy, prepared = None, None, None
        if needs_analysis(cfg.quant):
            significance, stage.analysis = run_analysis(loaded, cfg, run_dir, timings)
            if cfg.quant.switching.enabled:  # what a switch restores from, taken before quantizing
                policy = SWITCH_POLICIES.get(cfg.quant.switching.policy)
                t = time.perf_counter()
                prepared = policy.prepare(loaded.model, cfg, significance, run_dir)
                stage.cache_s = time.perf_counter() - t
        t = time.perf_counter()
        result = quantize(loaded.model, loaded.tokenizer, sources_of(cfg.dataset), known, cfg.quant, cfg.calib,
                          cfg.model.name, significance=significance,
                          errors=policy.quantize_errors(prepared) if policy is not None else None)
        timings["quantize_s"] = time.perf_counter() - t
        check_weights_finite(loaded.model, "after quantization", "raise quant.damp (e.g. quant.damp=0.1) "
                             "or try quant.method=rtn on this model")
        stats, stage.quantization, stage.codes = result.stats, result.summary, result.codes
        if result.plan is not None:
            result.plan.save(run_dir / "plan.json")
        if stage.analysis is not None:
            # the paper's overhead: analysis as a share of the offline stage (analysis + quantization);
            # with a cache hit, the share uses the seconds the cached captures took when computed
            offline = stage.analysis["capture_s"] + timings["quantize_s"]
            stage.analysis["share_of_offline"] = round(stage.analysis["capture_s"] / offline, 4) if offline else None
            write_dynamo_figures(cfg, run_dir, significance, result.plan)
        if policy is not None:
            stage.switcher = policy.build(loaded.model, result.plan, significance, prepared, cfg)
    elif cfg.calib.enabled:
        from .calibration.stage import calibrate

        t = time.perf_counter()
        stats = calibrate(loaded.model, loaded.tokenizer, sources_of(cfg.dataset), known, cfg.calib)
        timings["calibration_s"] = time.perf_counter() - t
    if stats is not None:
        stage.calibration = report_coverage(stats, list(cfg.calib.datasets or known), run_dir)
    return stage


def run_analysis(loaded, cfg: DictConfig, run_dir: Path, timings: dict):
    """DynaMo Step 1 on the FP16 model; the significance artifact lands in the run folder."""
    from .analysis import analysis_datasets, analyze

    t = time.perf_counter()
    significance, report = analyze(loaded.model, loaded.tokenizer, sources_of(cfg.dataset),
                                   analysis_datasets(cfg.analysis, known_datasets(cfg.dataset)), cfg.analysis,
                                   model_path=cfg.model.path, revision=cfg.model.revision, seed=cfg.seed)
    timings["analysis_s"] = time.perf_counter() - t
    significance.save(run_dir / "significance")
    return significance, {**report, **significance.summary(), "artifact": "significance.safetensors"}


def write_dynamo_figures(cfg: DictConfig, run_dir: Path, significance, plan) -> None:
    if not cfg.analysis.figures:
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
