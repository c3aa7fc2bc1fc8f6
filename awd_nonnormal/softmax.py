"""The output layer for large vocabularies: PyTorch's adaptive softmax
(``nn.AdaptiveLogSoftmaxWithLoss``; Grave, Joulin, Cissé, Grangier & Jégou 2017, "Efficient
softmax approximation for GPUs") with AWD-LSTM's cut-offs.

awd-lstm-lm trained WikiText-103 with a split softmax (``SplitCrossEntropyLoss``) whose splits
its ``main.py`` chose from the vocabulary size V: ``[2800, 20000, 76000]`` when V > 75,000 and
``[4200, 35000, 180000]`` when V > 500,000, a full softmax otherwise. :func:`resolve_cutoffs`
keeps that rule (``auto``). The head holds the ids below the first cut-off and one entry per
tail cluster; cluster i holds the ids in ``[cutoffs[i], cutoffs[i+1])``, so

    log p(w) = log p_head(w)                               (w < cutoffs[0])
    log p(w) = log p_head(cluster i) + log p_i(w)          (w in cluster i)

Unlike the split softmax, the tail clusters have their own smaller projections (``div_value``
4: cluster i works in ``E / 4^(i+1)`` dimensions), so the output layer is not tied to the
embedding: with ``--tied`` the last recurrent layer still has ``emsize`` units (the adaptive
softmax's input), but the embedding and the output weights are separate matrices.

The ids should be ordered by frequency for the head to cover the frequent words; this project's
vocabulary is in order of first appearance (as awd-lstm-lm's), which on WikiText-103 puts the
frequent words early but not exactly first.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torch import nn

__all__ = ["AUTO_CUTOFFS", "resolve_cutoffs", "check_cutoffs", "check_projection", "build_adaptive", "DIV_VALUE"]

#: ``(vocabulary size above which, cut-offs)``, largest first: awd-lstm-lm's main.py.
AUTO_CUTOFFS: Tuple[Tuple[int, Tuple[int, ...]], ...] = (
    (500_000, (4200, 35000, 180000)),
    (75_000, (2800, 20000, 76000)),
)
#: Each tail cluster's projection is ``div_value`` times smaller than the previous one.
DIV_VALUE = 4.0


def check_cutoffs(cutoffs: Sequence[int], ntoken: Optional[int] = None) -> Tuple[int, ...]:
    """``cutoffs`` as a tuple after checking it: positive, strictly increasing integers, each
    below the vocabulary size ``ntoken`` when that is known. Raises ValueError saying what is
    wrong."""
    out = tuple(cutoffs)
    for c in out:
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ValueError(f"cutoffs must be positive integers, got {list(out)}")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"cutoffs must be strictly increasing, got {list(out)}")
    if ntoken is not None and out and out[-1] >= ntoken:
        raise ValueError(f"cutoffs {list(out)} must all be below the vocabulary size {ntoken} "
                         f"(each starts a cluster of at least one word)")
    return out


def check_projection(in_features: int, cutoffs: Sequence[int]) -> None:
    """ValueError when the last tail cluster's projection ``in_features / 4^k`` (k clusters)
    would have no dimension left."""
    if cutoffs and int(in_features // (DIV_VALUE ** len(cutoffs))) < 1:
        raise ValueError(f"the adaptive softmax with cut-offs {list(cutoffs)} has {len(cutoffs)} tail "
                         f"clusters, whose projections shrink by {DIV_VALUE:g} each from the last layer's "
                         f"{in_features} units to less than 1: use fewer cut-offs or a larger --emsize/--nhid")


def resolve_cutoffs(cutoffs: Optional[Sequence[int]], ntoken: int) -> Tuple[int, ...]:
    """The cut-offs a model of ``ntoken`` words uses: ``None`` (auto) picks them by vocabulary
    size (:data:`AUTO_CUTOFFS`; ``()`` below 75,001 words, i.e. the full softmax); a sequence is
    checked and returned (``()``: full softmax)."""
    if cutoffs is None:
        for above, chosen in AUTO_CUTOFFS:
            if ntoken > above:
                return chosen
        return ()
    return check_cutoffs(cutoffs, ntoken)


def build_adaptive(in_features: int, ntoken: int, cutoffs: Sequence[int]) -> nn.AdaptiveLogSoftmaxWithLoss:
    """The adaptive softmax over ``ntoken`` words (with a head bias, like the full decoder)."""
    check_projection(in_features, cutoffs)
    return nn.AdaptiveLogSoftmaxWithLoss(in_features, ntoken, list(check_cutoffs(cutoffs, ntoken)),
                                         div_value=DIV_VALUE, head_bias=True)
