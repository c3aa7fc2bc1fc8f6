"""The paper's theory experiments on untrained networks (Orhan & Pitkow 2020, section 2).

* :func:`memory_curves`: Fisher memory curves ``J(k)`` and ``J_tot`` of four N = 100 linear
  networks (identity, random orthogonal, chain, chain with feedback) and the norm of a pulse
  travelling through each: Figure 1b-c.
* :func:`linear_decoding`: how well ``s_1`` is linearly decoded from ``h_100`` in chain and
  orthogonal networks, linear with and without noise and non-linear without noise: Figure 2,
  Appendix A, Figures 7-8.

Both are pure functions of a frozen config (seeded); ``python -m awd_nonnormal.experiments``
prints their tables and draws their figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Tuple

import torch
from torch import Tensor

from ..analysis import decoding_r2, fisher_memory_curve, simulate
from ..init import chain_, fbchain_, identity_, orthogonal_

__all__ = ["MemoryConfig", "MemoryCurve", "memory_networks", "memory_curves",
           "DecodingConfig", "DecodingRow", "CONDITIONS", "decoding_networks", "linear_decoding"]


# --------------------------------------------------------------------------------------------
# Figure 1: Fisher memory curves
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryConfig:
    n: int = 100            # network size (Figure 1 uses N = 100)
    k_max: int = 200        # memory curve J(k) for k = 0 .. k_max - 1
    lam: float = 0.99       # identity and orthogonal scale: radius < 1, so J_tot = 1
    alpha: float = 1.05     # chain feed-forward weight (> 1: transient amplification)
    fb_alpha: float = 1.05  # chain with feedback: feed-forward weight
    fb_beta: float = 0.1    # chain with feedback: feedback weight (spectral radius 2 sqrt(ab) cos(pi/(N+1)))
    seed: int = 0


class MemoryCurve(NamedTuple):
    name: str
    J: Tensor        # (k_max,)
    J_tot: float     # sum over all k
    pulse: Tensor    # (k_max,) ||W^k v||: the pulse entering at k = 0, k steps later


def memory_networks(cfg: MemoryConfig) -> Dict[str, Tuple[Tensor, Tensor]]:
    """``name -> (W (N, N), v (N,))`` in float64. The chains get their signal at the source unit
    ``v = e_0`` (paper section 2.1); the normal networks a random unit vector."""
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.n
    e0 = torch.zeros(n, dtype=torch.float64)
    e0[0] = 1.0
    rand_v = torch.randn(n, generator=g, dtype=torch.float64)
    rand_v /= rand_v.norm()
    empty = lambda: torch.empty(n, n, dtype=torch.float64)  # noqa: E731
    return {
        "identity": (identity_(empty(), scale=cfg.lam), rand_v),
        "orthogonal": (orthogonal_(empty(), scale=cfg.lam, generator=g), rand_v),
        "chain": (chain_(empty(), alpha=cfg.alpha), e0),
        "fbchain": (fbchain_(empty(), alpha=cfg.fb_alpha, beta=cfg.fb_beta), e0),
    }


def memory_curves(cfg: MemoryConfig) -> List[MemoryCurve]:
    """Fisher memory curves (Ganguli et al. 2008) and pulse norms for the four networks."""
    out = []
    for name, (w, v) in memory_networks(cfg).items():
        fm = fisher_memory_curve(w, v, cfg.k_max)
        u, norms = v.clone(), []
        for _ in range(cfg.k_max):
            norms.append(float(u.norm()))
            u = w @ u
        out.append(MemoryCurve(name, fm.J, fm.J_tot, torch.tensor(norms, dtype=torch.float64)))
    return out


# --------------------------------------------------------------------------------------------
# Figure 2 / Appendix A: linear decoding
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodingConfig:
    n: int = 100                 # network size
    scale: float = 1.01          # overall scale of both recurrent matrices (Appendix A)
    steps: int = 100             # decode s_1 from h_100
    trials: int = 250            # the paper's sample, for the in-sample R^2
    heldout_trials: int = 4000   # fit on one half, score on the other
    seed: int = 0

    def __post_init__(self) -> None:
        if self.heldout_trials < 4:  # each half needs 2 trials: one to fit, an R^2 over the other
            raise ValueError(f"heldout_trials must be at least 4 (split in halves), got {self.heldout_trials}")


#: (nonlinearity, noise sigma): Figure 2a-c and Figures 7-8.
CONDITIONS: Tuple[Tuple[str, float], ...] = (
    ("linear", 0.0), ("linear", 0.01), ("linear", 0.1), ("linear", 1.0),
    ("elu", 0.0), ("tanh", 0.0), ("relu", 0.0),
)


class DecodingRow(NamedTuple):
    nonlinearity: str
    noise: float
    model: str
    in_sample: float
    held_out: float


def decoding_networks(cfg: DecodingConfig, generator: torch.Generator) -> Dict[str, Tuple[Tensor, Tensor]]:
    """Chain ``W_ij = scale * delta_{j,i-1}`` with ``v = e_0``; orthogonal ``scale * Q`` with
    ``v_i ~ N(0, 1/sqrt(N))`` (Appendix A), both float64."""
    n = cfg.n
    e0 = torch.zeros(n, dtype=torch.float64)
    e0[0] = 1.0
    q = orthogonal_(torch.empty(n, n, dtype=torch.float64), scale=cfg.scale, generator=generator)
    v = torch.randn(n, generator=generator, dtype=torch.float64) / n ** 0.5
    return {"chain": (chain_(torch.empty(n, n, dtype=torch.float64), alpha=cfg.scale), e0),
            "orthogonal": (q, v)}


def linear_decoding(cfg: DecodingConfig) -> List[DecodingRow]:
    """R^2 of the linear decoder of ``s_1`` from ``h_100`` for every condition and both models."""
    rows = []
    for ci, (nonlinearity, noise) in enumerate(CONDITIONS):
        g = torch.Generator().manual_seed(cfg.seed * 1000 + ci)
        for model, (w, v) in decoding_networks(cfg, g).items():
            kw = dict(steps=cfg.steps, nonlinearity=nonlinearity, noise_std=noise, generator=g)
            s, h = simulate(w, v, cfg.trials, **kw)           # the paper's 250 trials
            in_sample = decoding_r2(h, s[:, 0], h, s[:, 0]).in_sample
            s, h = simulate(w, v, cfg.heldout_trials, **kw)   # fresh trials, split in two
            half = cfg.heldout_trials // 2
            held_out = decoding_r2(h[:half], s[:half, 0], h[half:], s[half:, 0]).held_out
            rows.append(DecodingRow(nonlinearity, noise, model, in_sample, held_out))
    return rows
