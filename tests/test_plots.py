"""The figures of awd_nonnormal/plots.py show what they draw: labels, markers, ticks (Agg)."""

from pathlib import Path

import pytest

from awd_nonnormal import plots
from awd_nonnormal.experiments import DecodingRow


@pytest.fixture
def drawn(monkeypatch, tmp_path):
    """Calls a plots function and returns its figure, drawn and still open (saved too)."""
    figures = []

    def keep(fig, path):
        fig.canvas.draw()
        figures.append(fig)
        fig.savefig(path)  # the figure renders; plots.save would close it
        return Path(path)

    monkeypatch.setattr(plots, "save", keep)

    def draw(function, *args, **kwargs):
        path = function(*args, tmp_path / f"fig{len(figures)}.png", **kwargs)
        assert path.stat().st_size > 1000
        return figures[-1]

    yield draw
    for fig in figures:
        plots.pyplot().close(fig)


def _ticks_in_view(axis):
    lo, hi = sorted(axis.get_view_interval())
    return [t for t in axis.get_majorticklocs() if lo <= t <= hi]


def test_one_epoch_curves_are_visible_points_on_integer_ticks(drawn):
    curves = {m: {"epoch": [1], "mean": [v], "sem": [0.0]}
              for m, v in (("chain", 1.79), ("identity", 1.57))}
    fig = drawn(lambda c, path: plots.task_loss_curves(c, 0.945, path, title="one epoch"), curves)
    ax = fig.axes[0]
    points = [line for line in ax.lines if line.get_label() in curves]
    assert len(points) == 2
    for line in points:
        assert line.get_marker() not in (None, "None", "", " ") and line.get_markersize() > 0
    ticks = _ticks_in_view(ax.xaxis)
    assert ticks and all(t == int(t) for t in ticks) and 1 in ticks
    # Many epochs: still integer ticks.
    curves = {"chain": {"epoch": list(range(1, 8)), "mean": [1.0] * 7, "sem": [0.1] * 7}}
    ax = drawn(lambda c, path: plots.task_loss_curves(c, 0.5, path), curves).axes[0]
    ticks = _ticks_in_view(ax.xaxis)
    assert len(ticks) >= 2 and all(t == int(t) for t in ticks)


ROWS = [DecodingRow("linear", 0.0, model, 0.9, 0.8) for model in ("chain", "orthogonal")]


def test_decoding_figure_names_the_decoded_step(drawn):
    ax = drawn(lambda r, path: plots.decoding_figure(r, path, steps=20), ROWS).axes[0]
    assert ax.get_ylabel() == "R^2 of s_1 from h_20"
    ax = drawn(lambda r, path: plots.decoding_figure(r, path, steps=100), ROWS).axes[0]
    assert ax.get_ylabel() == "R^2 of s_1 from h_100"
    ax = drawn(plots.decoding_figure, ROWS).axes[0]  # step not given: no step claimed
    assert "h_100" not in ax.get_ylabel() and ax.get_ylabel().startswith("R^2 of s_1 from")


PROFILE = [("trained (n=2)", [-1, 0, 1], [0.0, 0.1, 0.3], [0.01, 0.02, None])]


def test_weight_profile_panels_are_titled_as_the_caller_says(drawn):
    fig = drawn(plots.weight_profile_figure, {"i": PROFILE, "g": PROFILE})
    assert [ax.get_title() for ax in fig.axes] == ["gate i", "gate g"]
    fig = drawn(lambda p, path: plots.weight_profile_figure(p, path, panel=""),
                {"identity": PROFILE, "orthogonal": PROFILE})
    assert [ax.get_title() for ax in fig.axes] == ["identity", "orthogonal"]
    fig = drawn(lambda p, path: plots.weight_profile_figure(p, path, panel="init"),
                {"identity": PROFILE})
    assert [ax.get_title() for ax in fig.axes] == ["init identity"]
