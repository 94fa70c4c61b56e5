"""End-to-end decode speed: FP16 against the packed BQ model and packed BQ + full slot tables.

    python scripts/bench_decode.py                          # GPU: OLMoE's shapes, full depth, random weights
    python scripts/bench_decode.py --model mixtral --layers 8
    python scripts/bench_decode.py --toy --new-tokens 4 --prompt 8 --out /tmp/d.json    # CPU, toy shapes (tests)

Tokens per second of `model.generate` (greedy, exactly --new-tokens new tokens after a --prompt-token random
prompt, batch 1 and 8; median of --reps runs after one warm-up), for
- fp16: the model as transformers runs it, with its fastest experts implementation (--fp16-impls);
- bq: the same weights RTN-quantized with experts at widths 2/3/4 cycled (about 3 code bits, group 128),
  packed and attached (`attach_packed`): the model's own forward with the packed layers (Triton on CUDA);
- bq_slots: packed BQ with full slot tables (the adaptive switch on the packed model, to random
  windows, at the default budget: 1% of the experts' FP16 bytes).
Weights are random: decode speed does not depend on their values. The architecture is a paper model's
(assets/configs/, built by dynamo.dryrun.build), cut to --layers decoder layers if given; --toy shrinks every
width (a path check, never a speed). Without CUDA only --toy runs (speed numbers come from a GPU only).
Writes results/benchmarks/decode-<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from ..config import REPO_ROOT
from .common import GROUP_SIZE, MIXED_WIDTHS, device_slug, pack_mixed, param_bytes

NO_CUDA = ("bench_decode: a CUDA device is needed for speed numbers and none was found; nothing written "
           "(--toy runs the same path at toy shapes on CPU)")


def fill_slot_tables(model, plan, master, device: torch.device) -> dict:
    """The adaptive switch on the packed model, to random windows: full slot tables at the default budget
    (1% of the experts' FP16 bytes, 8-bit slots of the default candidates: low-rank components), what a switched
    deployment serves."""
    from ..switching.adaptive import AdaptiveSwitcher

    switcher = AdaptiveSwitcher(model, plan, master)
    ids = torch.randint(1, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(7))
    report = switcher.switch_to(ids.to(device))
    return {"slot_nbytes": report.extra_nbytes, "budget_nbytes": report.budget_nbytes, "slots": report.slots}


def build(name: str, layers: int | None, toy: bool, dtype: torch.dtype, device: torch.device):
    from ..dryrun.build import build_model, load_real_config, shrink_overrides

    overrides = shrink_overrides(load_real_config(name)) if toy else None
    if toy:  # a small head too, and no special ids outside it
        overrides.update(vocab_size=512, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    model = build_model(name, layers, overrides=overrides, dtype=dtype, device=str(device))
    model.generation_config.pad_token_id = 0
    return model


def tokens_per_s(model, batch: int, prompt: int, new_tokens: int, reps: int, device: torch.device) -> dict:
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    ids = ids.to(device)
    run = partial(model.generate, ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, do_sample=False)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        out = run()  # warm-up: kernel compilation, allocator
        assert out.shape == (batch, prompt + new_tokens), out.shape
        times = []
        for _ in range(reps):
            sync()
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
    return {"tokens_per_s": batch * new_tokens / statistics.median(times), "seconds": times}


def bench(args: argparse.Namespace, device: torch.device) -> dict:
    from ..packed.model import attach_packed
    from ..switching.adaptive import ExpertMaster

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build(args.model, args.layers, args.toy, dtype, device)
    measure = lambda: {b: tokens_per_s(model, b, args.prompt, args.new_tokens, args.reps, device)  # noqa: E731
                       for b in args.batches}
    rows: dict[str, dict] = {}
    by_impl = {}
    for impl in args.fp16_impls:
        model.set_experts_implementation(impl)
        by_impl[impl] = measure()
    rows["fp16"] = {str(b): max((by_impl[i][b] for i in by_impl), key=lambda r: r["tokens_per_s"])
                    for b in args.batches}
    fp16_bytes = param_bytes(model)
    master = ExpertMaster(model)  # what the switch restores from (host memory)
    packed, plan = pack_mixed(model)
    attach_packed(model, packed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows["bq"] = {str(b): r for b, r in measure().items()}
    tables = fill_slot_tables(model, plan, master, device)
    rows["bq_slots"] = {"slot_tables": tables, **{str(b): r for b, r in measure().items()}}
    speedup = {v: {b: round(rows[v][b]["tokens_per_s"] / rows["fp16"][b]["tokens_per_s"], 3) for b in rows["fp16"]}
               for v in ("bq", "bq_slots")}
    for v in rows:
        for b, r in rows[v].items():
            if isinstance(r, dict) and "tokens_per_s" in r:
                print(f"decode {args.model} {v:8s} batch {b}: {r['tokens_per_s']:.1f} tok/s", flush=True)
    return {"model": args.model, "layers": args.layers or "all", "toy": args.toy, "dtype": str(dtype),
            "widths": list(MIXED_WIDTHS), "group_size": GROUP_SIZE, "prompt_tokens": args.prompt,
            "new_tokens": args.new_tokens, "batches": args.batches, "reps": args.reps, "statistic": "median",
            "fp16_by_implementation": {i: {str(b): r for b, r in v.items()} for i, v in by_impl.items()},
            "results": rows, "speedup_vs_fp16": speedup,
            "param_bytes": {"fp16": fp16_bytes, "bq": param_bytes(model)}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="olmoe", help="a paper model of assets/configs/")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers kept (default: all)")
    parser.add_argument("--toy", action="store_true", help="every width shrunk: a CPU path check, not a speed")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--fp16-impls", nargs="+", default=None,
                        help="transformers experts implementations tried for FP16 (default: grouped_mm and eager "
                             "on CUDA, grouped_mm on CPU)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.toy:
        print(NO_CUDA, file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    args.fp16_impls = args.fp16_impls or (["grouped_mm", "eager"] if cuda else ["grouped_mm"])
    report = bench(args, device)
    report["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    report["command"] = "python scripts/bench_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = args.out or REPO_ROOT / "results" / "benchmarks" / f"decode-{device_slug(report['device'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0
