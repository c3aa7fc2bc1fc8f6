"""Pure measures of recurrent weight matrices and linear recurrent dynamics.

Everything here takes tensors and returns tensors or numbers; loading checkpoints and drawing
figures happen elsewhere. Computations run in float64 on the CPU, whatever the input's device.

* :func:`henrici_index`: departure from normality (Henrici 1962), paper section 3.2.
* :func:`pulse_response`, :func:`peak_order`, :func:`weight_profile`: the weight profile of units
  ordered by the time of their peak response (Rajan, Harvey & Tank 2016), paper Figures 5-6.
* :func:`fisher_memory_curve`: ``J(k)`` and ``J_tot`` (Ganguli, Huh & Sompolinsky 2008), Figure 1b.
* :func:`simulate`, :func:`decoding_r2`: linear decoding of a past input (paper Figure 2, App. A).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "Henrici", "henrici_index", "spectral_radius", "pulse_response", "peak_order", "weight_profile",
    "FisherMemory", "fisher_memory_curve", "discrete_lyapunov", "ACTIVATIONS", "simulate",
    "DecodingResult", "decoding_r2", "mean_sem",
]


def mean_sem(values: Iterable[float]) -> Tuple[float, float]:
    """Mean and standard error of the mean, ``std(ddof=1) / sqrt(n)``, over seeds or runs.

    Conventions: n = 0 gives (NaN, NaN); n = 1 gives s.e.m. 0.0 (one sample shows no spread,
    and a table or an error bar then shows none rather than a gap); when a value is not finite
    (a diverged run counted as inf) the mean is not finite either and the s.e.m. is 0.0."""
    x = [float(v) for v in values]
    n = len(x)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(x) / n
    if n == 1 or not all(math.isfinite(v) for v in x):
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in x) / (n - 1)
    return mean, math.sqrt(var / n)


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float64)


class Henrici(NamedTuple):
    raw: float          # d(W) = sqrt(||W||_F^2 - sum_i |lambda_i|^2)
    normalized: float   # d(W) / ||W||_F, in [0, 1]


def henrici_index(w: Tensor, eigvals: Optional[Tensor] = None) -> Henrici:
    """Henrici's departure from normality, ``d(W) = sqrt(max(0, ||W||_F^2 - sum_i |lambda_i|^2))``
    (Henrici 1962; paper section 3.2), raw and divided by ``||W||_F``.

    Zero exactly when W is normal (identity, orthogonal, symmetric); ``sqrt(N-1) * alpha`` for
    ``chain(alpha)``, whose eigenvalues are all zero. Pass ``eigvals`` when they are already known
    (they cost O(N^3); :func:`spectral_radius` can reuse them too).
    """
    w = _f64(w)
    if w.dim() != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"henrici_index needs a square matrix, got shape {tuple(w.shape)}")
    fro2 = float((w * w).sum())
    if eigvals is None:
        eigvals = torch.linalg.eigvals(w)
    eig2 = float(eigvals.abs().pow(2).sum())
    raw = math.sqrt(max(0.0, fro2 - eig2))
    # eigenvalues carry round-off of order eps * ||W||; don't report that as non-normality
    if raw <= 1e-6 * math.sqrt(fro2):
        raw = 0.0
    return Henrici(raw, raw / math.sqrt(fro2) if fro2 > 0 else 0.0)


def spectral_radius(w: Tensor, eigvals: Optional[Tensor] = None) -> float:
    """Largest eigenvalue modulus of a square matrix (``eigvals``: the eigenvalues, if known)."""
    if eigvals is None:
        eigvals = torch.linalg.eigvals(_f64(w))
    return float(eigvals.abs().max())


# --------------------------------------------------------------------------------------------
# Weight profiles (Rajan, Harvey & Tank 2016; paper Figures 5-6)
# --------------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "elu": torch.nn.functional.elu,
    "linear": lambda x: x,
}


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown nonlinearity {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def pulse_response(weight_hh: Tensor, weight_ih: Tensor, bias_ih: Optional[Tensor] = None,
                   bias_hh: Optional[Tensor] = None, *, cell: str = "RNN", nonlinearity: str = "tanh",
                   steps: int = 100) -> Tensor:
    """Hidden state of one recurrent layer driven by a unit pulse: an input vector of ones at
    ``t = 0``, then zero input for ``steps`` steps, from a zero state (the paper's section 3.2).

    ``cell`` is ``RNN`` (with ``nonlinearity``), ``LSTM`` or ``GRU`` in PyTorch's gate layout.
    Returns the hidden states ``(steps + 1, N)``, row t after the input of step t.
    """
    w_hh, w_ih = _f64(weight_hh), _f64(weight_ih)
    n, d = w_hh.shape[1], w_ih.shape[1]
    b = torch.zeros(w_hh.shape[0], dtype=torch.float64)
    if bias_ih is not None:
        b = b + _f64(bias_ih)
    b_hh = _f64(bias_hh) if bias_hh is not None else torch.zeros_like(b)
    x = torch.zeros(steps + 1, d, dtype=torch.float64)
    x[0] = 1.0
    h = torch.zeros(n, dtype=torch.float64)
    c = torch.zeros(n, dtype=torch.float64)
    out = []
    for t in range(steps + 1):
        gi = w_ih @ x[t] + b              # (G*N,)
        gh = w_hh @ h + b_hh              # (G*N,)
        if cell == "RNN":
            h = _activation(nonlinearity)(gi + gh)
        elif cell == "LSTM":             # PyTorch nn.LSTM equations, gates i f g o
            i, f, g, o = (gi + gh).chunk(4)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        elif cell == "GRU":              # PyTorch nn.GRU equations, gates r z n
            ir, iz, in_ = gi.chunk(3)
            hr, hz, hn = gh.chunk(3)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            h = (1 - z) * torch.tanh(in_ + r * hn) + z * h
        else:
            raise ValueError(f"unknown cell {cell!r}; known: RNN, LSTM, GRU")
        out.append(h)
    return torch.stack(out)  # (steps + 1, N)


def peak_order(activity: Tensor, jitter: float = 1e-3,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """Units ordered by the time of their peak activity (Rajan et al. 2016).

    ``activity`` is ``(T, N)``. Ties (units peaking at the same step, or silent units) are broken
    by adding ``U[0, jitter)`` to the peak times, drawn from ``generator``. Returns a permutation
    ``order`` of length N: ``order[0]`` peaks first.
    """
    if activity.dim() != 2:
        raise ValueError(f"activity must be (T, N), got shape {tuple(activity.shape)}")
    peak = _f64(activity).argmax(dim=0).to(torch.float64)  # (N,)
    noise = torch.rand(peak.shape, generator=generator, dtype=torch.float64) * jitter
    return torch.argsort(peak + noise)


def weight_profile(w: Tensor, order: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean weight per order difference (Rajan et al. 2016; paper Figure 5).

    ``w`` (N, N) is permuted to ``order`` and ``W[i, j]`` is averaged over all pairs with the same
    ``i - j`` (``i`` the receiving unit). Returns ``(offsets, profile)`` with
    ``offsets = -(N-1) .. N-1``. A chain gives a single peak at ``i - j = +1``.
    """
    w = _f64(w)
    n = w.shape[0]
    if w.dim() != 2 or w.shape[1] != n or order.numel() != n:
        raise ValueError(f"weight_profile needs an (N, N) matrix and N indices, "
                         f"got {tuple(w.shape)} and {order.numel()}")
    order = order.to("cpu")
    p = w[order][:, order]
    offsets = torch.arange(-(n - 1), n)
    # entries with i - j = k lie on the diagonal with offset -k
    profile = torch.stack([torch.diagonal(p, offset=-int(k)).mean() for k in offsets])
    return offsets, profile


# --------------------------------------------------------------------------------------------
# Fisher memory (Ganguli, Huh & Sompolinsky 2008)
# --------------------------------------------------------------------------------------------

def discrete_lyapunov(w: Tensor, q: Tensor, tol: float = 1e-15, max_doublings: int = 64) -> Tensor:
    """``C = sum_{k>=0} W^k Q (W^k)^T``, the solution of ``C = W C W^T + Q``, by Smith's doubling:
    ``C <- C + A C A^T``, ``A <- A^2`` adds ``2^j`` terms per step. Exact after ``log2(N)`` steps
    for a nilpotent W (a chain). Raises ``ValueError`` if the sum diverges (spectral radius >= 1
    and W not nilpotent)."""
    a, c = _f64(w), _f64(q)
    for _ in range(max_doublings):
        update = a @ c @ a.T
        c = c + update
        a = a @ a
        a_norm = float(a.abs().max())
        if not math.isfinite(a_norm) or not bool(torch.isfinite(c).all()):
            break
        if a_norm == 0.0 or float(update.abs().max()) <= tol * float(c.abs().max()) and a_norm < 1.0:
            return c
    raise ValueError("the noise covariance sum_k W^k W^k^T diverges: W needs spectral radius < 1 "
                     "(or to be nilpotent, like a chain)")


class FisherMemory(NamedTuple):
    J: Tensor      # (K,) J(k) for k = 0 .. K-1
    J_tot: float   # sum over all k >= 0 (not only the first K)


def fisher_memory_curve(w: Tensor, v: Tensor, K: int, normalize: bool = True) -> FisherMemory:
    """Fisher memory curve of ``h_t = W h_{t-1} + v s_t + z_t``, ``z_t ~ N(0, I)`` (Ganguli et al.
    2008, eq. 3-4 of the paper): ``J(k) = v^T (W^k)^T C^{-1} W^k v`` with ``C = sum_k W^k (W^k)^T``.

    ``J_tot = sum_{k>=0} J(k) = tr(C^{-1} C_v)`` with ``C_v = sum_k W^k v v^T (W^k)^T``, computed
    exactly rather than from the first ``K`` terms. The theory takes ``||v|| = 1`` (``J`` scales
    with ``||v||^2``); ``normalize`` scales ``v`` to unit norm. ``J_tot = 1`` for any normal W with
    spectral radius < 1, and ``J_tot <= N`` always.
    """
    w, v = _f64(w), _f64(v).reshape(-1)
    n = w.shape[0]
    if w.shape != (n, n) or v.numel() != n:
        raise ValueError(f"need W (N, N) and v (N,), got {tuple(w.shape)} and {tuple(v.shape)}")
    if normalize:
        v = v / v.norm()
    eye = torch.eye(n, dtype=torch.float64)
    c = discrete_lyapunov(w, eye)                          # (N, N), symmetric, C >= I
    chol, info = torch.linalg.cholesky_ex(c)
    if int(info) != 0:
        raise ValueError("the noise covariance C is too ill-conditioned for float64 (W amplifies "
                         f"transients by ~{float(c.diagonal().max()) ** 0.5:.1e}); use a smaller gain")
    js = []
    u = v.clone()                                          # W^k v
    for _ in range(K):
        y = torch.cholesky_solve(u[:, None], chol)[:, 0]   # C^{-1} W^k v
        js.append(float(u @ y))
        u = w @ u
    c_v = discrete_lyapunov(w, torch.outer(v, v))
    j_tot = float(torch.cholesky_solve(c_v, chol).diagonal().sum())
    return FisherMemory(torch.tensor(js, dtype=torch.float64), j_tot)


# --------------------------------------------------------------------------------------------
# Linear decoding of a past input (paper section 2.2, Appendix A)
# --------------------------------------------------------------------------------------------

def simulate(w: Tensor, v: Tensor, trials: int, steps: int = 100, *, nonlinearity: str = "linear",
             noise_std: float = 0.0, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Run ``h_t = f(W h_{t-1} + v s_t + sigma z_t)`` from ``h_0 = 0`` for ``steps`` steps with
    ``s_t ~ N(0, 1)`` and ``z_t ~ N(0, I)`` i.i.d. (paper eq. 5 and Appendix A).

    Returns ``(s, h)``: the inputs ``(trials, steps)`` and the final states ``(trials, N)``.
    """
    f = _activation(nonlinearity)
    w, v = _f64(w), _f64(v).reshape(-1)
    n = w.shape[0]
    s = torch.randn(trials, steps, generator=generator, dtype=torch.float64)   # (trials, steps)
    h = torch.zeros(trials, n, dtype=torch.float64)                           # (trials, N)
    for t in range(steps):
        pre = h @ w.T + s[:, t:t + 1] * v
        if noise_std > 0:
            pre = pre + noise_std * torch.randn(trials, n, generator=generator, dtype=torch.float64)
        h = f(pre)
    return s, h


def _r2(x: Tensor, y: Tensor, beta: Tensor) -> float:
    resid = y - x @ beta
    total = ((y - y.mean()) ** 2).sum()
    return float(1.0 - (resid ** 2).sum() / total)


class DecodingResult(NamedTuple):
    in_sample: float   # R^2 of the fit on its own trials (what the paper reports)
    held_out: float    # R^2 on trials the fit never saw


def _design(h: Tensor) -> Tensor:
    return torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], dim=1)  # with intercept


def decoding_r2(h_fit: Tensor, s_fit: Tensor, h_test: Tensor, s_test: Tensor) -> DecodingResult:
    """Least-squares decoder of ``s`` from ``h`` (with intercept), fitted on ``(h_fit, s_fit)``;
    R^2 in sample and on ``(h_test, s_test)``. States that overflowed are scored as R^2 = nan."""
    x_fit, x_test = _design(_f64(h_fit)), _design(_f64(h_test))
    y_fit, y_test = _f64(s_fit).reshape(-1), _f64(s_test).reshape(-1)
    if not (torch.isfinite(x_fit).all() and torch.isfinite(x_test).all()):
        return DecodingResult(float("nan"), float("nan"))
    # scale columns so lstsq is well conditioned whatever the activity's magnitude
    scale = x_fit.abs().amax(dim=0).clamp_min(1e-300)
    beta = torch.linalg.lstsq(x_fit / scale, y_fit[:, None], driver="gelsd").solution[:, 0] / scale
    return DecodingResult(_r2(x_fit, y_fit, beta), _r2(x_test, y_test, beta))
