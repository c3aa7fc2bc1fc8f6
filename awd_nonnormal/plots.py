"""Every figure the project draws, with matplotlib's headless ``Agg`` backend.

Functions take plain numbers and tensors, draw one figure, save it as PNG and return the path.
matplotlib is imported lazily so that the rest of the package works without a display.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Union

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _integer_ticks():
    """Integer ticks only, also when the view holds a single integer (one epoch, say: by default
    MaxNLocator falls back to fractional ticks when it finds fewer than two integers)."""
    from matplotlib.ticker import MaxNLocator
    return MaxNLocator(integer=True, min_n_ticks=1)


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


def decoding_figure(rows, path: PathLike, *, steps: Optional[int] = None) -> Path:
    """Figures 2, 7, 8: R^2 of decoding s_1 from h_steps (the paper: h_100), chain vs orthogonal,
    per condition, in-sample (solid) and held-out (hatched). ``rows`` are ``DecodingRow`` tuples;
    ``steps`` is the ``DecodingConfig.steps`` they were decoded at (the y label; None: the label
    names the last state without a step)."""
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
    source = f"h_{steps}" if steps is not None else "the last state"
    ax.set(ylabel=f"R^2 of s_1 from {source}", ylim=(0, 1.05), title="Linear decoding of a past input")
    ax.legend(fontsize=8, ncol=2)
    return save(fig, path)


# --------------------------------------------------------------------------------------------
# Post-hoc analysis of checkpoints (paper Figures 5-6; analyze.py)
# --------------------------------------------------------------------------------------------

def weight_profile_figure(panels, path: PathLike, *, title: str = "", max_offset=20,
                          panel: str = "gate") -> Path:
    """Figures 5-6: mean recurrent weight against the order difference ``i - j`` of units ordered
    by their peak time, one panel per gate (or per model). ``panels`` maps a panel name (the gate)
    to a list of curves ``(label, offsets, mean, sem)``; each is drawn as a line with a shaded
    +- s.e.m. band (no band where the s.e.m. is undefined, n = 1). A panel is titled
    ``"{panel} {name}"`` ("gate g"), or its name alone when ``panel`` is empty (Figure 5's
    "identity", "orthogonal"). ``max_offset`` limits the x axis to ``[-max_offset, max_offset]``;
    None shows every offset."""
    import numpy as np
    plt = pyplot()
    names = list(panels)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.0), squeeze=False)
    styles = [dict(color="tab:blue"), dict(color="tab:gray", linestyle="--")]
    for ax, name in zip(axes[0], names):
        for k, (label, offsets, mean, sem) in enumerate(panels[name]):
            x = np.asarray(offsets, dtype=float)
            m = np.asarray([np.nan if v is None else v for v in mean], dtype=float)
            s = np.asarray([np.nan if v is None else v for v in sem], dtype=float)
            if max_offset is not None:
                keep = np.abs(x) <= max_offset
                x, m, s = x[keep], m[keep], s[keep]
            style = styles[k % len(styles)]
            ax.plot(x, m, label=label, lw=1.3, **style)
            band = np.isfinite(s)
            if band.any():
                ax.fill_between(x, np.where(band, m - s, np.nan), np.where(band, m + s, np.nan),
                                color=style["color"], alpha=0.25, lw=0)
        ax.axhline(0.0, color="k", lw=0.5)
        ax.axvline(0.0, color="k", lw=0.5, linestyle=":")
        ax.set(title=f"{panel} {name}" if panel else str(name), xlabel="order difference i - j")
        if max_offset is not None:
            ax.set_xlim(-max_offset, max_offset)
    axes[0][0].set_ylabel("mean weight W[i, j]")
    axes[0][-1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def weight_heatmap(rows, *, title: str = "", order: str = "peak"):
    """The figure of :func:`weight_heatmap_figure`, not saved (returned for inspection)."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator
    plt = pyplot()
    labels = list(rows)
    gates = list(dict.fromkeys(g for r in rows.values() for g in r))
    shape = (len(labels), len(gates)) if len(gates) > 1 else (1, len(labels))  # one gate: side by side
    fig, axes = plt.subplots(*shape, figsize=(3.4 * shape[1], 3.0 * shape[0]), squeeze=False)
    for r, label in enumerate(labels):
        for c, gate in enumerate(gates):
            ax = axes[r][c] if len(gates) > 1 else axes[0][r]
            if gate not in rows[label]:
                ax.axis("off")
                continue
            w = np.asarray(rows[label][gate], dtype=float)
            finite = np.abs(w[np.isfinite(w)])
            vmax = float(finite.max()) if finite.size else 0.0
            vmax = vmax or 1.0
            im = ax.imshow(w, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
            for axis in (ax.xaxis, ax.yaxis):   # at most 5 integer ticks: readable at N = 100 or 1150
                axis.set_major_locator(MaxNLocator(nbins=4, integer=True))
            ax.tick_params(labelsize=7)
            ax.set_title(f"{label}: gate {gate}", fontsize=9)
            ax.set_xlabel(f"from unit j ({order} order)", fontsize=8)
            ax.set_ylabel(f"to unit i ({order} order)", fontsize=8)
            bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def weight_heatmap_figure(rows, path: PathLike, *, title: str = "", order: str = "peak") -> Path:
    """The recurrent weight matrix of each gate as a heat map (rows: receiving unit i, columns:
    sending unit j), the units already permuted by the caller. ``rows`` maps a row label
    (``trained``, ``initial``) to ``{gate: (N, N) array}``. The colour scale is symmetric about 0
    and spans the largest ``|W|`` of each panel (an identity reads +-1)."""
    return save(weight_heatmap(rows, title=title, order=order), path)


# --------------------------------------------------------------------------------------------
# Synthetic-task sweeps (paper Figure 3)
# --------------------------------------------------------------------------------------------

def task_loss_curves(curves, baseline: float, path: PathLike, *, title: str = "") -> Path:
    """Figure 3a-c: validation loss per epoch of each model's best config, mean +- s.e.m. over
    seeds (shaded), with the random baseline dashed. ``curves`` maps a model name to
    ``{"epoch": [...], "mean": [...], "sem": [...]}``. Curves of few epochs are drawn with
    markers (a one-epoch curve is a single point); the epoch ticks are integers."""
    import numpy as np
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    epochs = []
    for name, c in curves.items():
        epoch = np.asarray(c["epoch"], dtype=float)
        mean = np.asarray(c["mean"], dtype=float)
        sem = np.asarray(c["sem"], dtype=float)
        epochs.extend(epoch.tolist())
        color = _MODEL_COLORS.get(name)
        ax.plot(epoch, mean, label=name, color=color, marker="o" if len(epoch) <= 30 else None,
                markersize=4)
        ax.fill_between(epoch, mean - sem, mean + sem, color=color, alpha=0.25, linewidth=0)
    if epochs and max(epochs) - min(epochs) < 1:  # one epoch: room around it, not +- 5 %
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="random baseline")
    ax.set(xlabel="epoch", ylabel="validation loss", yscale="log",
           title=f"{title}: best configuration per model" if title else "best configuration per model")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.legend(fontsize=8)
    return save(fig, path)


def task_success_counts(counts, path: PathLike, *, title: str = "") -> Path:
    """Figure 3d-f: number of successful runs (final validation loss below half of the random
    baseline) of each model, out of its runs. ``counts`` maps a model name to
    ``(successes, runs)``."""
    plt = pyplot()
    names = list(counts)
    fig, ax = plt.subplots(figsize=(1.2 * max(len(names), 3) + 1.5, 3.8))
    succ = [counts[n][0] for n in names]
    bars = ax.bar(range(len(names)), succ, color=[_MODEL_COLORS.get(n, "tab:gray") for n in names])
    for bar, n in zip(bars, names):
        ax.annotate(f"{counts[n][0]}/{counts[n][1]}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set(ylabel="successful runs", ylim=(0, max(max(succ, default=0), 1) * 1.2),
           title=f"{title}: runs below 50 % of the baseline" if title else "runs below 50 % of the baseline")
    ax.yaxis.set_major_locator(_integer_ticks())
    return save(fig, path)
