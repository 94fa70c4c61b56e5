"""Token perplexity as quantization papers compute it (GPTQ, AWQ, MoEPTQ, DynaMo).

Protocol: join a split's documents with the source's separator, tokenise once, cut
non-overlapping windows of `seqlen` tokens (the tail shorter than a window is dropped),
and average the next-token loss over every predicted token (seqlen - 1 per window, no
context carried across windows). This is not lm-eval's `word_perplexity`.
A model trained with a BOS token at every window start (`model.bos_windows`) gets windows
of BOS + seqlen - 1 stream tokens (dynamo/eval/windows.py): still seqlen - 1 predicted
tokens per window, now every stream token of the window, and never BOS itself.
"""

from __future__ import annotations

import math
from typing import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import UserError
from .windows import cut_windows, window_span


@dataclass
class PerplexityResult:
    ppl: float
    nll: float                 # mean next-token loss, nats
    predicted_tokens: int
    windows: int
    available_windows: int     # full windows in the split; `windows` may be capped
    seqlen: int
    corpus_tokens: int
    window_nll: list[float] = field(default_factory=list)  # mean loss of each window: paired comparisons

    def protocol(self) -> dict:
        out = asdict(self)
        del out["ppl"], out["nll"], out["window_nll"]
        return out


def tokenize_corpus(tokenizer, documents: list[str], separator: str) -> torch.Tensor:
    ids = tokenizer(separator.join(documents), add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def make_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None, name: str = "dataset",
                 setting: str = "eval.seqlen", bos_id: int | None = None) -> torch.Tensor:
    """`setting` names the config key of `seqlen` in the message (calibration passes its own);
    with `bos_id`, each window is BOS + seqlen - 1 tokens of `ids`."""
    if ids.numel() < window_span(seqlen, bos_id):
        raise UserError(f"{name}: {ids.numel()} tokens is less than one window of {setting}={seqlen}; "
                        f"lower {setting} or add text")
    return cut_windows(ids, seqlen, max_windows, bos_id)


def input_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def token_perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int,
                     available_windows: int | None = None, corpus_tokens: int | None = None,
                     desc: str = "ppl", on_logprobs: Callable[[int, torch.Tensor], None] | None = None
                     ) -> PerplexityResult:
    """`on_logprobs(first window index, log-probs [b, T - 1, V])` sees every batch's next-token
    log-probabilities (the KL meter), computed once for the loss and for it."""
    device = input_device(model)
    total_nll, predicted, window_nll = 0.0, 0, []
    batches = range(0, len(windows), batch_size)
    for start in tqdm(batches, desc=desc, leave=False, disable=len(batches) < 2):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        # fp32 loss: bf16 logits lose ~0.5% of PPL on large vocabularies
        if on_logprobs is None:
            token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                         reduction="none").view(len(batch), -1)
        else:  # the same loss from log-probs the KL meter reuses (cross_entropy = log_softmax + gather)
            logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            token_loss = -logprobs.gather(-1, batch[:, 1:, None]).squeeze(-1)
            on_logprobs(start, logprobs)
            del logprobs
        total_nll += token_loss.sum().item()
        window_nll += token_loss.mean(dim=1).tolist()
        predicted += batch[:, 1:].numel()
    nll = total_nll / predicted
    return PerplexityResult(ppl=math.exp(nll), nll=nll, predicted_tokens=predicted, windows=len(windows),
                            available_windows=available_windows or len(windows), seqlen=windows.shape[1],
                            corpus_tokens=corpus_tokens or windows.numel(), window_nll=window_nll)
