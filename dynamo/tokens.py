"""The one place a run tokenizes its text: each (dataset, split) once, windows cut from it.

Evaluation (every pass: FP16 reference, BQ, the run, the stream), calibration, DynaMo's
analysis, each DQS switch and the export's switch all read their windows from one `RunTokens`,
so a split is loaded and tokenized once per run however many stages read it. Cutting windows
from the cached ids is cheap (a view; a copy with BOS).

`bos_id` (the tokenizer's BOS when `model.bos_windows` is true) opens every window with BOS,
as the model was trained (dynamo/eval/windows.py); None keeps plain windows. The config says
it (a testbed model's preset sets it), so it is in the record and its hash; a checkpoint's
training.json that disagrees is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig, SourceConfig
from .data import load_documents
from .errors import UserError
from .eval.perplexity import make_windows, tokenize_corpus
from .eval.windows import window_span

TRAINING_FILE = "training.json"  # beside a checkpoint trained by scripts/train_embedded.py


@dataclass(frozen=True)
class TokenizedSplit:
    """One split of one dataset: its documents joined by the source's separator, tokenized."""

    documents: int
    separator: str
    ids: torch.Tensor


class RunTokens:
    """`documents` holds splits already loaded ({(dataset, split): documents}); others load on first use."""

    def __init__(self, tokenizer, sources: dict[str, SourceConfig], bos_id: int | None = None,
                 documents: dict[tuple[str, str], list[str]] | None = None):
        self.tokenizer, self.sources, self.bos_id = tokenizer, sources, bos_id
        self._documents: dict[tuple[str, str], list[str]] = dict(documents or {})
        self._splits: dict[tuple[str, str], TokenizedSplit] = {}

    def documents(self, name: str, split: str) -> list[str]:
        key = (name, split)
        if key not in self._documents:
            self._documents[key] = load_documents(self.sources[name], split)
        return self._documents[key]

    def split(self, name: str, split: str) -> TokenizedSplit:
        key = (name, split)
        if key not in self._splits:
            source = self.sources[name]
            docs = self.documents(name, split)
            self._splits[key] = TokenizedSplit(len(docs), source.separator,
                                               tokenize_corpus(self.tokenizer, docs, source.separator))
        return self._splits[key]

    def tokenized(self) -> list[tuple[str, str]]:
        """The (source, split) pairs tokenized so far."""
        return list(self._splits)

    def windows(self, name: str, split: str, seqlen: int, max_windows: int | None = None, *,
                label: str | None = None, setting: str = "eval.seqlen") -> torch.Tensor:
        """[n, seqlen] windows of the split (BOS-led with `bos_id`); `label` and `setting` name the
        dataset and the config key in the error for a split shorter than one window."""
        return make_windows(self.split(name, split).ids, seqlen, max_windows, label or name, setting=setting,
                            bos_id=self.bos_id)

    def available_windows(self, name: str, split: str, seqlen: int) -> int:
        """Full windows in the split, before any cap."""
        return self.split(name, split).ids.numel() // window_span(seqlen, self.bos_id)


def trained_with_bos(model_cfg: ModelConfig) -> bool | None:
    """What the checkpoint's training.json (scripts/train_embedded.py) says of BOS windows; None without one."""
    path = Path(str(model_cfg.path)).expanduser() / TRAINING_FILE
    if not path.is_file():
        return None
    try:
        train = json.loads(path.read_text(encoding="utf-8")).get("train", {})
    except (OSError, ValueError, AttributeError):
        return None  # not ours to judge: the loader reports a broken checkpoint
    return bool(train.get("bos_windows", False)) if isinstance(train, dict) else None


def bos_id_as_trained(model_cfg: ModelConfig, tokenizer) -> int | None:
    """The BOS id if the checkpoint's training.json says every training window opened with it, else
    None: for scripts that load an embedded model by path, without the preset's model.bos_windows."""
    return tokenizer.bos_token_id if trained_with_bos(model_cfg) else None


def bos_id_for(model_cfg: ModelConfig, tokenizer) -> int | None:
    """The BOS id every window starts with when the model was trained so (`model.bos_windows`).
    A checkpoint whose training.json says otherwise is refused: its numbers would be off-protocol."""
    trained = trained_with_bos(model_cfg)
    if trained is not None and trained != model_cfg.bos_windows:
        how = "with a BOS token opening every window" if trained else "on plain windows (no BOS)"
        raise UserError(f"{model_cfg.name} was trained {how} ({TRAINING_FILE}), but model.bos_windows="
                        f"{str(model_cfg.bos_windows).lower()}; set model.bos_windows={str(trained).lower()}")
    if not model_cfg.bos_windows:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise UserError(f"model.bos_windows=true but {model_cfg.name}'s tokenizer has no BOS token; "
                        "set model.bos_windows=false or give the tokenizer a bos_token")
    return int(bos)
