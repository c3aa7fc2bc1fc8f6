"""Every figure the project draws, with matplotlib's headless ``Agg`` backend.

Functions take plain numbers and tensors, draw one figure, save it as PNG and return the path.
matplotlib is imported lazily so that the rest of the package works without a display.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: PathLike) -> Path:
    """Save ``fig`` as a PNG (creating the folder) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    logger.info("wrote %s", path)
    return path


# --------------------------------------------------------------------------------------------
# Theory experiments (paper Figures 1-2, 7-8)
# --------------------------------------------------------------------------------------------

_MODEL_COLORS = {"identity": "tab:blue", "orthogonal": "tab:orange", "chain": "tab:green",
                 "fbchain": "tab:red", "plain": "tab:gray", "mixed": "tab:purple"}


def memory_figure(curves, path: PathLike) -> Path:
    """Figure 1b-c: Fisher memory curves J(k) and the norm of a pulse over time, one line per
    network. ``curves`` are :class:`awd_nonnormal.experiments.MemoryCurve` tuples."""
    plt = pyplot()
    fig, (ax_j, ax_p) = plt.subplots(1, 2, figsize=(10, 3.8))
    for c in curves:
        k = range(len(c.J))
        color = _MODEL_COLORS.get(c.name)
        ax_j.plot(k, c.J.clamp_min(1e-12), label=f"{c.name} (J_tot = {c.J_tot:.2f})", color=color)
        ax_p.plot(k, c.pulse.clamp_min(1e-12), label=c.name, color=color)
    ax_j.set(yscale="log", xlabel="k (time steps in the past)", ylabel="J(k)", title="Fisher memory curve",
             ylim=(1e-4, 1.5))
    ax_p.set(yscale="log", xlabel="time since pulse", ylabel="||h_t|| (= ||W^t v||)",
             title="Pulse travelling through the network")
    ax_j.legend(fontsize=8)
    ax_p.legend(fontsize=8)
    return save(fig, path)


def decoding_figure(rows, path: PathLike) -> Path:
    """Figures 2, 7, 8: R^2 of decoding s_1 from h_100, chain vs orthogonal, per condition,
    in-sample (solid) and held-out (hatched). ``rows`` are ``DecodingRow`` tuples."""
    plt = pyplot()
    conditions = []
    for r in rows:
        key = (r.nonlinearity, r.noise)
        if key not in conditions:
            conditions.append(key)
    models = sorted({r.model for r in rows}, key=lambda m: list(_MODEL_COLORS).index(m)
                    if m in _MODEL_COLORS else 99)
    by_key = {(r.nonlinearity, r.noise, r.model): r for r in rows}
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / (2 * len(models))
    for ci, (nl, noise) in enumerate(conditions):
        for mi, model in enumerate(models):
            r = by_key[(nl, noise, model)]
            x = ci + (2 * mi - len(models)) * width + width / 2
            color = _MODEL_COLORS.get(model)
            ax.bar(x, r.in_sample, width, color=color, label=f"{model}, in sample" if ci == 0 else None)
            ax.bar(x + width, max(r.held_out, 0.0), width, color=color, alpha=0.45, hatch="//",
                   label=f"{model}, held out" if ci == 0 else None)
    ax.set_xticks(range(len(conditions)))
    ax.set_xticklabels([f"{nl}\n" + (f"sigma={noise:g}" if noise else "no noise") for nl, noise in conditions])
    ax.set(ylabel="R^2 of s_1 from h_100", ylim=(0, 1.05), title="Linear decoding of a past input")
    ax.legend(fontsize=8, ncol=2)
    return save(fig, path)
