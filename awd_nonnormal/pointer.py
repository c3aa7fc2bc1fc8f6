"""The continuous cache pointer (Grave, Joulin & Usunier 2017, "Improving neural language models
with a continuous cache"), as awd-lstm-lm's ``pointer.py`` applies it to a trained model.

The split is read as one stream (batch size 1) in chunks of ``bptt`` tokens with the hidden
state carried over. At position t the model's last-layer output ``h_t`` (E,) queries the outputs
of the previous ``window`` positions, each stored with the word that followed it (Grave et al.
2017, eqs. 2-3)::

    p_cache(w | h_t) = sum_{i in [t - window, t), x_{i+1} = w} softmax_i(theta * h_t . h_i)
    p(w | h_t)       = (1 - lambda) * p_vocab(w | h_t) + lambda * p_cache(w | h_t)

computed in log space (``logaddexp``), so that ``lambda = 0`` gives exactly the model's own
log-probabilities. Only the target's probability is needed, so an adaptive softmax never builds
the full distribution. The first position of the stream has no history and uses ``p_vocab``.
awd-lstm-lm used the cache only once a full window of history existed; here every position with
some history uses it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch import Tensor

from .data import batchify, get_batch
from .model import RNNModel

logger = logging.getLogger(__name__)

#: Rows of last-layer output whose loss is computed at once (bounds the (rows, V) logits).
_NLL_ROWS = 1024

__all__ = ["CacheConfig", "CacheResult", "stream_outputs", "cache_log_probs", "mix_nll",
           "evaluate_with_cache"]


@dataclass(frozen=True)
class CacheConfig:
    """The cache's settings (awd-lstm-lm pointer.py's flags and defaults).

    Attributes:
        lambdasm: weight lambda of the cache distribution, in [0, 1].
        theta: inverse temperature of the attention over the history.
        window: number of previous positions in the cache.
        bptt: chunk length of the evaluation (the hidden state is carried between chunks).
    """

    lambdasm: float = 0.12785920428335693
    theta: float = 0.6625523432485668
    window: int = 3785
    bptt: int = 5000

    def __post_init__(self) -> None:
        if not 0.0 <= self.lambdasm <= 1.0:
            raise ValueError(f"lambdasm must be in [0, 1], got {self.lambdasm}")
        if not math.isfinite(self.theta):
            raise ValueError(f"theta must be a finite number, got {self.theta}")
        for name in ("window", "bptt"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class CacheResult:
    """Mean losses (nats per token) over one split: the model alone and with the cache."""

    tokens: int
    plain_loss: float
    cache_loss: float


def stream_outputs(model: RNNModel, ids: Tensor, bptt: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run ``model`` (in eval mode) over the id stream ``ids`` (n,) as one column in chunks of
    ``bptt``. Returns ``(outputs (n-1, E), targets (n-1,), nll (n-1,), chunk_ends (k,))``: the
    last-layer output at each position, the next word, the model's loss on it (nats), and the
    end of each chunk (for summing in the order :func:`awd_nonnormal.lm.evaluate` does)."""
    device = model.encoder.weight.device
    source = batchify(ids, 1, device)  # (n, 1)
    model.eval()
    hidden = model.init_hidden(1)
    outs, tgts, nlls, ends = [], [], [], []
    done = 0
    with torch.no_grad():
        for i in range(0, source.size(0) - 1, bptt):
            data, targets = get_batch(source, i, bptt)  # (L, 1), (L,)
            output, hidden = model(data, hidden, decode=False)  # (L, 1, E)
            tgts.append(targets)
            flat = output.view(-1, output.size(-1))  # (L, E)
            outs.append(flat)
            # in blocks of rows, so that a full softmax over a large vocabulary fits in memory
            nlls.append(torch.cat([model.nll(o, t) for o, t in
                                   zip(flat.split(_NLL_ROWS), targets.split(_NLL_ROWS))]))
            done += targets.numel()
            ends.append(done)
    return torch.cat(outs), torch.cat(tgts), torch.cat(nlls), torch.tensor(ends)


def cache_log_probs(outputs: Tensor, targets: Tensor, theta: float, window: int,
                    block: int = 1024) -> Tensor:
    """``log p_cache(targets[t] | outputs[t])`` (n,) for a stream of outputs (n, E) whose position
    i is followed by ``targets[i]``: attention ``softmax(theta * h_t . h_i)`` over the positions
    ``i in [t - window, t)`` (Grave et al. 2017, eq. 2), summed over those whose next word is the
    target. ``-inf`` where no position in the window is followed by the target, and at t = 0.
    Queries are processed ``block`` at a time, so memory is O(block * (block + window))."""
    n = outputs.size(0)
    out = torch.full((n,), -math.inf, dtype=outputs.dtype, device=outputs.device)
    for s in range(0, n, block):
        e = min(s + block, n)
        k0 = max(0, s - window)
        q = outputs[s:e]  # (b, E)
        keys = outputs[k0:e]  # (m, E)
        scores = theta * (q @ keys.t())  # (b, m)
        t = torch.arange(s, e, device=outputs.device)[:, None]  # (b, 1)
        i = torch.arange(k0, e, device=outputs.device)[None, :]  # (1, m)
        allowed = (i < t) & (i >= t - window)  # (b, m)
        match = allowed & (targets[k0:e][None, :] == targets[s:e][:, None])  # (b, m)
        neg = torch.tensor(-math.inf, dtype=scores.dtype, device=scores.device)
        norm = torch.logsumexp(torch.where(allowed, scores, neg), dim=1)  # (b,)
        hit = torch.logsumexp(torch.where(match, scores, neg), dim=1)  # (b,)
        has_history = allowed.any(dim=1)
        out[s:e] = torch.where(has_history, hit - torch.where(has_history, norm, torch.zeros_like(norm)), neg)
    return out


def mix_nll(nll: Tensor, log_cache: Tensor, lambdasm: float) -> Tensor:
    """``-log((1 - lambda) p_vocab + lambda p_cache)`` (n,) from the model's ``nll = -log p_vocab``
    and ``log p_cache``, in log space (``lambda = 0`` returns ``nll`` exactly)."""
    log_vocab = -nll
    a = log_vocab + (math.log1p(-lambdasm) if lambdasm < 1 else -math.inf)
    b = log_cache + (math.log(lambdasm) if lambdasm > 0 else -math.inf)
    return -torch.logaddexp(a, b)


def _chunked_mean(values: Tensor, ends: Tensor) -> float:
    """Mean of ``values`` summed chunk by chunk in float64, the order of ``lm.evaluate``."""
    total = torch.zeros((), dtype=torch.float64, device=values.device)
    start = 0
    for end in ends.tolist():
        total += values[start:end].double().sum()
        start = end
    return total.item() / values.numel()


def evaluate_with_cache(model: RNNModel, ids: Tensor, config: CacheConfig) -> CacheResult:
    """Mean loss over the id stream ``ids`` (n,) with and without the cache."""
    outputs, targets, nll, ends = stream_outputs(model, ids, config.bptt)
    log_cache = cache_log_probs(outputs.float(), targets, config.theta, config.window)
    mixed = mix_nll(nll, log_cache.to(nll.dtype), config.lambdasm)
    mixed[:1] = nll[:1]  # the stream's first position has no history: p_vocab alone, not (1 - lambda) p_vocab
    return CacheResult(int(targets.numel()), _chunked_mean(nll, ends), _chunked_mean(mixed, ends))


def evaluate_splits(model: RNNModel, splits: Dict[str, Tensor], config: CacheConfig) -> Dict[str, CacheResult]:
    """:func:`evaluate_with_cache` over named id streams (e.g. ``{"valid": ..., "test": ...}``)."""
    results = {}
    for name, ids in splits.items():
        results[name] = evaluate_with_cache(model, ids, config)
        r = results[name]
        logger.info("%s: %d tokens, loss %.4f without the cache, %.4f with it", name, r.tokens,
                    r.plain_loss, r.cache_loss)
    return results
