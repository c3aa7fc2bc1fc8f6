"""Verdicts: pure functions from our numbers to reproduced / not reproduced / not run.

Each returns a :class:`Verdict` whose ``reason`` states the criterion and the numbers it saw, so
that the report shows why. They take plain numbers (no files, no torch), so the tests feed them
hand-made values.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, NamedTuple, Optional, Sequence, Tuple

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_RUN = "not run at this budget"
STATUSES = (REPRODUCED, NOT_REPRODUCED, NOT_RUN)


class Verdict(NamedTuple):
    claim: str
    status: str
    reason: str


def not_run(claim: str, reason: str) -> Verdict:
    return Verdict(claim, NOT_RUN, reason)


def _ok(flag: bool) -> str:
    return REPRODUCED if flag else NOT_REPRODUCED


def _finite(x: Optional[float]) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def memory(j_tot: Mapping[str, float], n: int, *, tol: float = 1e-3, extensive: float = 2.0) -> Verdict:
    """Figure 1b: ``J_tot`` of identity and orthogonal within ``tol`` of 1 (Ganguli et al. 2008),
    chain and fbchain above ``extensive`` (well past the normal networks' 1) and at most ``N``."""
    normal = [j_tot[k] for k in ("identity", "orthogonal")]
    nonnormal = [j_tot[k] for k in ("chain", "fbchain")]
    holds = (all(abs(j - 1.0) <= tol for j in normal)
             and all(extensive < j <= n + tol for j in nonnormal))
    shown = ", ".join(f"{k} {v:.3f}" for k, v in j_tot.items())
    return Verdict("J_tot = 1 (normal), 1 << J_tot <= N (non-normal)", _ok(holds),
                   f"criterion: |J_tot - 1| <= {tol:g} for identity and orthogonal, "
                   f"{extensive:g} < J_tot <= N = {n} for chain and fbchain; ours: {shown}")


def chain_beats_orthogonal(rows: Iterable[Tuple[str, float, float, float]], *, tol: float = 0.02,
                           floor: float = 0.05, which: str = "in-sample") -> Verdict:
    """Figure 2: rows ``(condition, noise, chain R^2, orthogonal R^2)``. Without noise in the
    linear network both must be >= 0.99; in every other condition chain >= orthogonal - ``tol``,
    where two values both below ``floor`` (neither network decodes) count as a tie."""
    bad, ties = [], []
    for cond, noise, chain, orth in rows:
        if cond == "linear" and noise == 0:
            if min(chain, orth) < 0.99:
                bad.append(f"linear without noise: {chain:.3f} / {orth:.3f} (< 0.99)")
        elif max(chain, orth) < floor:
            ties.append(f"{cond} sigma={noise:g}" if noise else cond)
        elif chain < orth - tol:
            bad.append(f"{cond}{f' sigma={noise:g}' if noise else ''}: chain {chain:.3f} < "
                       f"orthogonal {orth:.3f}")
    reason = (f"criterion ({which} R^2): both >= 0.99 in the noiseless linear network, chain >= "
              f"orthogonal - {tol:g} elsewhere (both < {floor:g} is a tie)")
    if ties:
        reason += f"; ties (neither decodes): {', '.join(ties)}"
    if bad:
        reason += f"; fails: {'; '.join(bad)}"
    return Verdict(f"chain decodes s_1 at least as well as orthogonal ({which})", _ok(not bad), reason)


def lower_is_better(values: Mapping[str, Optional[float]], better: Sequence[str], worse: Sequence[str],
                    claim: str, *, what: str = "loss") -> Verdict:
    """The best of ``better`` has a lower value than the best of ``worse`` (losses). Missing or
    non-finite values are left out; if either side has none, the claim was not run."""
    b = {k: values[k] for k in better if _finite(values.get(k))}
    w = {k: values[k] for k in worse if _finite(values.get(k))}
    if not b or not w:
        return not_run(claim, f"no finished {what} for {'/'.join(better) if not b else '/'.join(worse)}")
    bk, wk = min(b, key=b.get), min(w, key=w.get)
    holds = b[bk] < w[wk]
    return Verdict(claim, _ok(holds), f"criterion: best of {'/'.join(better)} {what} < best of "
                   f"{'/'.join(worse)}; ours: {bk} {b[bk]:.4f} vs {wk} {w[wk]:.4f}")


def not_better(values: Mapping[str, Optional[float]], model: str, reference: str, claim: str, *,
               tol: float = 0.0) -> Verdict:
    """``model``'s loss is not lower than ``reference``'s by more than ``tol`` (Table 3: chain is
    not better than orthogonal in LSTMs)."""
    a, r = values.get(model), values.get(reference)
    if not (_finite(a) and _finite(r)):
        return not_run(claim, f"no finished loss for {model if not _finite(a) else reference}")
    return Verdict(claim, _ok(a >= r - tol), f"criterion: {model} >= {reference} - {tol:g}; ours: "
                   f"{model} {a:.4f}, {reference} {r:.4f}")


def lowest(values: Mapping[str, Optional[float]], model: str, claim: str) -> Verdict:
    """``model`` has the lowest loss of all (Table 3: mixed on the character-level corpora)."""
    vals = {k: v for k, v in values.items() if _finite(v)}
    if model not in vals or len(vals) < 2:
        return not_run(claim, f"no finished loss for {model} or nothing to compare it with")
    best = min(vals, key=vals.get)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(vals.items(), key=lambda kv: kv[1]))
    return Verdict(claim, _ok(best == model), f"criterion: {model} lowest; ours: {shown}")


def success_counts(counts: Mapping[str, Tuple[int, int]], better: Sequence[str], worse: Sequence[str],
                   claim: str) -> Verdict:
    """Figure 3d-f: the best success fraction of ``better`` exceeds the best of ``worse``. No
    success at all is not a reproduction (the claim is about which models succeed)."""
    frac = {k: (s / n if n else 0.0) for k, (s, n) in counts.items()}
    shown = ", ".join(f"{k} {s}/{n}" for k, (s, n) in counts.items())
    b = max((frac[k] for k in better if k in frac), default=None)
    w = max((frac[k] for k in worse if k in frac), default=None)
    if b is None or w is None or not any(n for _, n in counts.values()):
        return not_run(claim, "no finished runs")
    none = "" if b or w else " (no run of either kind succeeded)"
    return Verdict(claim, _ok(b > w), f"criterion: best success fraction of {'/'.join(better)} > best "
                   f"of {'/'.join(worse)}; ours: {shown}{none}")


def henrici_positive(trained: Sequence[float], initial: Sequence[float], claim: str, *,
                     margin: float = 1e-3) -> Verdict:
    """Table 2: every trained network's ``d(W)`` exceeds ``margin`` plus the largest initial value
    (0 for identity and orthogonal up to rounding)."""
    if not trained:
        return not_run(claim, "no trained network to analyse")
    start = max(initial, default=0.0)
    low = min(trained)
    return Verdict(claim, _ok(low > start + margin),
                   f"criterion: min trained d(W) > max initial d(W) + {margin:g}; ours: trained "
                   f"{low:.4f} .. {max(trained):.4f} over {len(trained)} network(s), initial <= {start:.2g}")


def forward_bump(offsets: Sequence[int], profile: Sequence[float], z_plus1: Optional[float], claim: str, *,
                 z_min: float = 2.0) -> Verdict:
    """Figure 5 / 6d: an asymmetric bump at a positive ``i - j``: ``profile(+1) > profile(-1)``
    and the value at +1 at least ``z_min`` standard deviations above the shuffled-order null."""
    p = dict(zip(offsets, profile))
    if 1 not in p or -1 not in p or not (_finite(p[1]) and _finite(p[-1])):
        return not_run(claim, "no profile at i - j = +-1")
    holds = p[1] > p[-1] and _finite(z_plus1) and z_plus1 >= z_min
    z = f"{z_plus1:.2f}" if _finite(z_plus1) else "n/a"
    return Verdict(claim, _ok(holds), f"criterion: W(+1) > W(-1) and z(+1) >= {z_min:g} against the "
                   f"shuffled-order null; ours: W(+1) {p[1]:.4f}, W(-1) {p[-1]:.4f}, z(+1) {z}")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 pairs or a
    constant sequence."""
    def ranks(v: Sequence[float]):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r
    if len(x) < 3:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def increasing(offsets: Sequence[int], profile: Sequence[float], claim: str, *, window: int = 10,
               rho_min: float = 0.5) -> Verdict:
    """Figure 6a-c: the profile is a roughly increasing function of ``i - j``: Spearman
    correlation of profile and offset over ``0 < |i - j| <= window`` at least ``rho_min``."""
    pairs = [(o, v) for o, v in zip(offsets, profile) if 0 < abs(o) <= window and _finite(v)]
    rho = spearman([o for o, _ in pairs], [v for _, v in pairs])
    if not math.isfinite(rho):
        return not_run(claim, "profile too short or constant")
    return Verdict(claim, _ok(rho >= rho_min), f"criterion: Spearman rho(i - j, W) >= {rho_min:g} over "
                   f"0 < |i - j| <= {window}; ours: rho {rho:.2f}")
