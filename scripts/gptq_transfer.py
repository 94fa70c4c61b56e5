"""How well does GPTQ's error compensation transfer to data it was not calibrated on?

GPTQ minimises ||(W - Q) X||^2 on the calibration activations X by pushing the rounding error
into directions those activations rarely use. If another dataset's activations do use them,
GPTQ can be worse than plain RTN there. This script measures it per domain, expert by expert:
GPTQ fitted on the known domains' calibration split, RTN at the same width, and the output
error tr(dW H_d dW^T) of each on every domain d's calibration split (H_d: that domain's routed
Hessian of the expert's inputs). One-shot (every layer sees FP16 inputs), not sequential.

    python scripts/gptq_transfer.py --model assets/models/tiny-olmoe --bits 3

Writes results/diagnostics/gptq_transfer_<model>_<bits>bit.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dynamo.adapters import moe_layers
from dynamo.calibration import capture
from dynamo.calibration.stage import calibration_windows
from dynamo.config import REPO_ROOT, CalibConfig, SourceConfig
from dynamo.data import embedded_split
from dynamo.quant import QSpec, quantize_gptq, quantize_rtn
from dynamo.records import write_json_atomic
from dynamo.tokens import RunTokens

KNOWN, NOVEL = embedded_split()


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    return float(torch.einsum("ij,jk,ik->", delta, hessian, delta))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "assets" / "models" / "tiny-olmoe")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--windows", type=int, default=32, help="calibration windows per known domain")
    parser.add_argument("--eval-windows", type=int, default=16, help="windows per domain for the error")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", type=Path, help="default: results/diagnostics/gptq_transfer_<model>_<bits>bit.json")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sources = {name: SourceConfig(path=name) for name in KNOWN + NOVEL}
    calib = OmegaConf.structured(CalibConfig(windows=args.windows, seqlen=args.seqlen))
    tokens = RunTokens(tokenizer, sources)
    known = torch.cat(list(calibration_windows(tokens, KNOWN, calib).values()))
    fit = capture(model, known)
    probe_cfg = OmegaConf.merge(calib, {"windows": args.eval_windows})
    probes = {d: capture(model, w) for d, w in calibration_windows(tokens, KNOWN + NOVEL, probe_cfg).items()}
    spec = QSpec(args.bits)
    totals = {d: {"rtn": 0.0, "gptq": 0.0, "gptq_worse": 0, "matrices": 0} for d in probes}
    per_expert = []
    for layer in moe_layers(model):
        stats = fit.layers[layer.index].routed
        for e in range(layer.n_experts):
            row = {"layer": layer.index, "expert": e, "known_tokens": int(stats.tokens[e]), "ratio": {}}
            errs = {d: [0.0, 0.0] for d in probes}
            for projection in ("gate", "up", "down"):
                w = layer.weight(e, projection).float()
                h_fit = stats.hessian_mid[e] if projection == "down" else stats.hessian_in[e]
                d_rtn = quantize_rtn(w, spec).dequantize() - w
                d_gptq = quantize_gptq(w, h_fit, spec)[0].dequantize() - w
                for d, probe in probes.items():
                    s = probe.layers[layer.index].routed
                    h = s.hessian_mid[e] if projection == "down" else s.hessian_in[e]
                    r, g = output_error(d_rtn, h), output_error(d_gptq, h)
                    errs[d][0] += r
                    errs[d][1] += g
                    totals[d]["rtn"] += r
                    totals[d]["gptq"] += g
                    totals[d]["gptq_worse"] += int(g > r)
                    totals[d]["matrices"] += 1
            row["ratio"] = {d: (g / r if r > 0 else None) for d, (r, g) in errs.items()}
            per_expert.append(row)
    summary = {d: {"gptq_over_rtn": t["gptq"] / t["rtn"], "gptq_worse_share": t["gptq_worse"] / t["matrices"],
                   "role": "known" if d in KNOWN else "novel"} for d, t in totals.items()}
    print(f"output error of GPTQ-{args.bits}bit / RTN-{args.bits}bit, summed over every expert projection")
    print(f"{'domain':<12}{'role':<7}{'GPTQ/RTN':>10}{'GPTQ worse on':>16}")
    for d, s in summary.items():
        print(f"{d:<12}{s['role']:<7}{s['gptq_over_rtn']:>10.3f}{s['gptq_worse_share']:>15.1%}")
    out = args.out or REPO_ROOT / "results" / "diagnostics" / f"gptq_transfer_{args.model.name}_{args.bits}bit.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, {"command": "python scripts/gptq_transfer.py " + " ".join(argv or sys.argv[1:]),
                            "model": str(args.model.relative_to(REPO_ROOT) if args.model.is_relative_to(REPO_ROOT)
                                         else args.model),
                            "bits": args.bits, "calibration": {"domains": KNOWN, "windows": args.windows,
                                                               "seqlen": args.seqlen},
                            "probe_windows": args.eval_windows, "domains": summary, "experts": per_expert,
                            "seconds": round(time.perf_counter() - t0, 1)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
