"""Sampling text from a trained language model (awd-lstm-lm's ``generate.py``).

Each next token is drawn from ``softmax(log p(w | history) / temperature)``: temperature 1 samples
the model's distribution, a lower one sharpens it towards the most likely word (its entropy falls),
a higher one flattens it. The draws come from a ``torch.Generator`` seeded by the caller, so a seed
gives the same text on every run (on one device and PyTorch build).

The text starts after an optional prompt (its tokens are fed to the model first), otherwise after
``<eos>``, a sentence start (awd-lstm-lm started from a random token). Tokens are turned into text
by the corpus's kind (:func:`corpus_kind`):

* ``word``: tokens joined by spaces, ``<eos>`` a line break;
* ``char`` (character-level PTB: one character per token, ``_`` for a space): characters joined,
  ``_`` a space, ``<eos>`` a line break;
* ``byte`` (enwik8: each byte as its decimal value): the bytes decoded as UTF-8.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .data import EOS, Dictionary
from .model import RNNModel

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "Sample", "corpus_kind", "encode_prompt", "decode", "sample", "PromptError"]

KINDS = ("word", "char", "byte")
SPACE = "_"
UNK = "<unk>"


class PromptError(ValueError):
    """A prompt holds a token that is not in the vocabulary."""


@dataclass
class Sample:
    """Sampled token ids and the mean entropy (nats) of the distributions they were drawn from."""

    ids: List[int]
    mean_entropy: float


def corpus_kind(dictionary: Dictionary) -> str:
    """``byte`` when every token but ``<eos>`` is a decimal byte value (enwik8), ``char`` when every
    token but ``<eos>`` and ``<unk>`` is a single character and ``_`` is one of them, else
    ``word``."""
    tokens = [t for t in dictionary.idx2word if t not in (EOS, UNK)]
    if tokens and all(t.isdigit() and int(t) < 256 for t in tokens) and UNK not in dictionary.word2idx:
        return "byte"
    if tokens and SPACE in dictionary.word2idx and all(len(t) == 1 for t in tokens):
        return "char"
    return "word"


def encode_prompt(text: str, dictionary: Dictionary, kind: str) -> List[int]:
    """The ids of a prompt written as plain text: words split on whitespace (``word``),
    characters with spaces as ``_`` (``char``), UTF-8 bytes (``byte``); line breaks are
    ``<eos>``. Unknown words become ``<unk>`` when the vocabulary has it, else PromptError."""
    lines = text.split("\n")
    tokens: List[str] = []
    for n, line in enumerate(lines):
        if kind == "word":
            tokens.extend(line.split())
        elif kind == "char":
            tokens.extend(SPACE if ch.isspace() else ch for ch in line.strip())
        else:
            tokens.extend(str(b) for b in line.encode("utf-8"))
        if n < len(lines) - 1:
            tokens.append(EOS)
    w2i = dictionary.word2idx
    ids = []
    for t in tokens:
        if t in w2i:
            ids.append(w2i[t])
        elif UNK in w2i:
            ids.append(w2i[UNK])
        else:
            raise PromptError(f"prompt token {t!r} is not in the vocabulary of {len(dictionary)} tokens "
                              f"(and it has no {UNK})")
    return ids


def decode(ids: Sequence[int], dictionary: Dictionary, kind: str) -> str:
    """Readable text of token ids (see the module docstring)."""
    words = [dictionary.idx2word[i] for i in ids]
    if kind == "word":
        lines, line = [], []
        for w in words:
            if w == EOS:
                lines.append(" ".join(line))
                line = []
            else:
                line.append(w)
        return "\n".join(lines + [" ".join(line)])
    if kind == "char":
        return "".join("\n" if w == EOS else " " if w == SPACE else w for w in words)
    data = bytearray()
    for w in words:
        data.extend(b"\n" if w == EOS else bytes([int(w)]))
    return data.decode("utf-8", errors="replace")


def sample(model: RNNModel, words: int, *, temperature: float = 1.0, generator: torch.Generator,
           prompt: Sequence[int] = (), start: Optional[int] = None) -> Sample:
    """Draw ``words`` tokens from ``model`` after feeding ``prompt`` (ids), or after the single
    token ``start`` when there is no prompt. ``generator`` is a CPU generator (the draws happen on
    the CPU, so a seed gives the same text on any device)."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if words < 0:
        raise ValueError(f"words must be >= 0, got {words}")
    context = list(prompt) if prompt else [start if start is not None else 0]
    device = model.encoder.weight.device
    model.eval()
    ids: List[int] = []
    entropy = 0.0
    with torch.no_grad():
        hidden = model.init_hidden(1)
        inp = torch.tensor(context, dtype=torch.long, device=device).view(-1, 1)  # (L, 1)
        for _ in range(words):
            output, hidden = model(inp, hidden, decode=False)  # (L, 1, E)
            logp = model.log_probs(output[-1, 0]).double().cpu() / temperature  # (V,)
            logp = logp - torch.logsumexp(logp, 0)
            p = logp.exp()
            entropy += float(-(p * logp).sum())
            nxt = int(torch.multinomial(p, 1, generator=generator))
            ids.append(nxt)
            inp = torch.tensor([[nxt]], dtype=torch.long, device=device)  # (1, 1)
    return Sample(ids, entropy / words if words else 0.0)
