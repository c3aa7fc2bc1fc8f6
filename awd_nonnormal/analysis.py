"""Pure measures of recurrent weight matrices and linear recurrent dynamics.

Everything here takes tensors and returns tensors or numbers; loading checkpoints and drawing
figures happen elsewhere. Computations run in float64 on the CPU, whatever the input's device.

* :func:`spectrum`, :func:`henrici_index`, :func:`spectral_radius`: departure from normality
  (Henrici 1962; paper section 3.2) and spectral radius, exact where a structure allows and
  otherwise with an error estimate and a ``reliable`` flag.
* :func:`pulse_response`, :func:`pulse_deviation`, :func:`peak_order`, :func:`weight_profile`,
  :func:`shuffled_profiles`: the weight profile of units ordered by the time of their peak
  response (Rajan, Harvey & Tank 2016; paper Figures 5-6) and its shuffled-order null.
* :func:`fisher_memory_curve`: ``J(k)`` and ``J_tot`` (Ganguli, Huh & Sompolinsky 2008), Figure 1b.
* :func:`simulate`, :func:`decoding_r2`: linear decoding of a past input (paper Figure 2, App. A).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "Henrici", "Spectrum", "PERTURBATIONS", "spectrum", "henrici_index", "spectral_radius",
    "pulse_response", "pulse_deviation", "peak_order", "weight_profile", "ShuffledNull", "shuffled_profiles",
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


#: Relative sizes ``||E||_F / ||W||_F`` of the random perturbations whose effect on the eigenvalues
#: estimates their round-off error when no exact method applies (two draws of each size).
PERTURBATIONS: Tuple[float, ...] = (1e-14, 1e-14, 1e-12, 1e-12)
#: A value counts as reliable when its estimated error is below this fraction of it ...
RELIABLE_REL = 0.01
#: ... or below this fraction of ``||W||_F`` (values that are zero up to round-off).
RELIABLE_ABS = 1e-5


class Henrici(NamedTuple):
    raw: float              # d(W) = sqrt(||W||_F^2 - sum_i |lambda_i|^2)
    normalized: float       # d(W) / ||W||_F, in [0, 1]
    error: float = 0.0      # estimated error of ``raw`` (0 where an exact method applies)
    reliable: bool = True   # error <= 1 % of raw, or <= 1e-5 ||W||_F
    method: str = "given"   # how the eigenvalues were found (see :func:`spectrum`)


class Spectrum(NamedTuple):
    """Eigenvalues of a square matrix, how they were found, and what follows from them."""
    eigvals: Tensor         # (N,) complex128
    method: str             # symmetric, triangular, tridiagonal or general
    fro: float              # ||W||_F, of W itself (a similarity does not keep it)
    henrici: Henrici
    radius: float           # max_i |lambda_i|
    radius_error: float     # estimated error of ``radius`` (0 for the exact methods)
    radius_reliable: bool


def _reliable(value: float, error: float, fro: float) -> bool:
    return error <= RELIABLE_REL * abs(value) or error <= RELIABLE_ABS * fro


def _sum_sq(x: Tensor) -> float:
    """Sum of squares (of moduli) in extended precision (``math.fsum``, exactly rounded)."""
    x = x.abs() if x.is_complex() else x
    return math.fsum((x.to(torch.float64) ** 2).flatten().tolist())


def _structured_eigvals(w: Tensor) -> Optional[Tuple[str, Tensor, float]]:
    """``(method, eigenvalues, d(W)^2)`` for matrices whose eigenvalues are known without
    round-off trouble, else None.

    * symmetric: ``eigvalsh``; normal, so ``d = 0``.
    * triangular (a chain): the eigenvalues are the diagonal and ``d^2`` is the sum of squares of
      the off-diagonal entries (Schur form = the matrix itself).
    * tridiagonal with ``W[i, i+1] W[i+1, i] >= 0`` (a chain with feedback): the characteristic
      polynomial of a tridiagonal matrix depends only on its diagonal and the products
      ``W[i, i+1] W[i+1, i]`` (three-term recurrence), so W has the eigenvalues of the symmetric
      ``T`` with off-diagonal ``sqrt(W[i, i+1] W[i+1, i])``, found by ``eigvalsh`` (for non-zero
      products ``T = D W D^-1``, a diagonal similarity whose entries would span
      ``(alpha / beta)^(N/2)``; Wilkinson 1965, ch. 5). Then ``sum |lambda|^2 = ||T||_F^2``, so
      ``d^2 = sum_i (|W[i, i+1]| - |W[i+1, i]|)^2`` exactly.
    """
    if torch.equal(w, w.T):
        return "symmetric", torch.linalg.eigvalsh(w).to(torch.complex128), 0.0
    lower, upper = torch.equal(w, torch.tril(w)), torch.equal(w, torch.triu(w))
    if lower or upper:
        off = w - torch.diag(w.diagonal())
        return "triangular", w.diagonal().to(torch.complex128), _sum_sq(off)
    if torch.equal(w, torch.triu(torch.tril(w, 1), -1)):
        up, down = w.diagonal(1), w.diagonal(-1)   # W[i, i+1], W[i+1, i]
        prod = up * down
        if bool((prod >= 0).all()):
            t = torch.diag(w.diagonal()) + torch.diag(prod.sqrt(), 1) + torch.diag(prod.sqrt(), -1)
            return "tridiagonal", torch.linalg.eigvalsh(t).to(torch.complex128), _sum_sq(up.abs() - down.abs())
    return None


def spectrum(w: Tensor, perturbations: Sequence[float] = PERTURBATIONS,
             generator: Optional[torch.Generator] = None) -> Spectrum:
    """Eigenvalues of a square matrix with the Henrici index and spectral radius they give, each
    with an error estimate and a ``reliable`` flag.

    Near a chain the eigenvalues are badly conditioned: the eigenvalues LAPACK returns for
    ``fbchain(0.99, 0.04)`` at N = 256 have modulus ~0.9 where the exact ones are
    ``2 sqrt(alpha beta) cos(k pi / (N + 1)) <= 0.398``. So:

    1. symmetric, triangular and sign-symmetric tridiagonal matrices get exact methods (see
       :func:`_structured_eigvals`): the identity, exact chains, fbchains;
    2. any other matrix gets ``torch.linalg.eigvals`` (LAPACK ``geev``, which balances first) and an
       error estimate: the largest change of ``sum |lambda|^2`` and of the radius when W is
       perturbed by random ``E`` with ``||E||_F = delta ||W||_F``, ``delta`` in ``perturbations``
       (round-off is a perturbation of about ``1e-16 N``; where the result moves under 1e-14, it is
       not determined by W). A value is ``reliable`` when its error is at most 1 % of it, or at
       most ``1e-5 ||W||_F``.

    ``||W||_F`` always comes from W itself, and sums of squares are summed exactly
    (``math.fsum``). ``generator`` draws the perturbations (default: seeded with 0, so results
    are reproducible).
    """
    w = _f64(w)
    if w.dim() != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"need a square matrix, got shape {tuple(w.shape)}")
    fro2 = _sum_sq(w)
    fro = math.sqrt(fro2)
    structured = _structured_eigvals(w)
    if structured is not None:
        method, eigvals, d2 = structured
        raw = math.sqrt(max(0.0, d2))
        h = Henrici(raw, raw / fro if fro > 0 else 0.0, 0.0, True, method)
        return Spectrum(eigvals, method, fro, h, float(eigvals.abs().max()), 0.0, True)

    eigvals = torch.linalg.eigvals(w)
    s0, r0 = _sum_sq(eigvals), float(eigvals.abs().max())
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    err_s = err_r = 0.0
    for delta in perturbations:
        e = torch.randn(w.shape, generator=gen, dtype=torch.float64)   # (N, N)
        ev = torch.linalg.eigvals(w + e * (delta * fro / float(e.norm())))
        err_s = max(err_s, abs(_sum_sq(ev) - s0))
        err_r = max(err_r, abs(float(ev.abs().max()) - r0))
    d2 = fro2 - s0
    raw = math.sqrt(max(0.0, d2))
    # d from d^2 +- its error: the error of d is the larger distance to the ends of that range
    error = max(math.sqrt(max(0.0, d2 + err_s)) - raw, raw - math.sqrt(max(0.0, d2 - err_s)))
    # the eigenvalues carry round-off of order eps ||W||: don't report that as non-normality
    if raw <= max(error, 1e-6 * fro):
        raw = 0.0
    reliable = error <= RELIABLE_REL * raw or err_s <= (RELIABLE_ABS * fro) ** 2
    h = Henrici(raw, raw / fro if fro > 0 else 0.0, error, reliable, "general")
    return Spectrum(eigvals, "general", fro, h, r0, err_r, _reliable(r0, err_r, fro))


def henrici_index(w: Tensor, eigvals: Optional[Tensor] = None) -> Henrici:
    """Henrici's departure from normality, ``d(W) = sqrt(max(0, ||W||_F^2 - sum_i |lambda_i|^2))``
    (Henrici 1962; paper section 3.2), raw and divided by ``||W||_F``, with an error estimate and a
    ``reliable`` flag (see :func:`spectrum`).

    Zero exactly when W is normal (identity, orthogonal, symmetric); ``sqrt(N-1) * alpha`` for
    ``chain(alpha)``, whose eigenvalues are all zero. With ``eigvals`` given, they are taken as
    exact (no error estimate).
    """
    if eigvals is None:
        return spectrum(w).henrici
    w = _f64(w)
    if w.dim() != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"henrici_index needs a square matrix, got shape {tuple(w.shape)}")
    fro2 = _sum_sq(w)
    raw = math.sqrt(max(0.0, fro2 - _sum_sq(eigvals)))
    if raw <= 1e-6 * math.sqrt(fro2):
        raw = 0.0
    return Henrici(raw, raw / math.sqrt(fro2) if fro2 > 0 else 0.0)


def spectral_radius(w: Tensor, eigvals: Optional[Tensor] = None) -> float:
    """Largest eigenvalue modulus of a square matrix (``eigvals``: the eigenvalues, if known;
    otherwise :func:`spectrum` finds them, exactly where it can)."""
    if eigvals is None:
        return spectrum(w).radius
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


def _cell_step(cell: str, nonlinearity: str, pre_i: Tensor, pre_h: Tensor, h: Tensor,
               c: Tensor) -> Tuple[Tensor, Tensor]:
    """One step of PyTorch's cell equations from the input part ``pre_i = W_ih x + b_ih`` and the
    recurrent part ``pre_h = W_hh h + b_hh`` (both ``(B, G*N)``); returns the new ``(h, c)``."""
    if cell == "RNN":
        return _activation(nonlinearity)(pre_i + pre_h), c
    if cell == "LSTM":             # PyTorch nn.LSTM equations, gates i f g o
        i, f, g, o = (pre_i + pre_h).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if cell == "GRU":              # PyTorch nn.GRU equations, gates r z n
        ir, iz, in_ = pre_i.chunk(3, dim=-1)
        hr, hz, hn = pre_h.chunk(3, dim=-1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        return (1 - z) * torch.tanh(in_ + r * hn) + z * h, c
    raise ValueError(f"unknown cell {cell!r}; known: RNN, LSTM, GRU")


def _run_pulses(weight_hh: Tensor, weight_ih: Tensor, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor],
                amplitudes: Tuple[float, ...], cell: str, nonlinearity: str, steps: int,
                stop_when_equal: bool = False) -> Tensor:
    """Hidden states of one layer for a batch of pulses ``a * ones`` at ``t = 0`` (one per entry of
    ``amplitudes``), zero input after, from a zero state: ``(T, B, N)`` with ``T <= steps + 1``.
    ``stop_when_equal``: stop once every run is in the same state (h and c) as the first, after
    which they stay equal."""
    if cell == "RNN":
        _activation(nonlinearity)
    w_hh, w_ih = _f64(weight_hh), _f64(weight_ih)
    n, d = w_hh.shape[1], w_ih.shape[1]
    b_ih = _f64(bias_ih) if bias_ih is not None else torch.zeros(w_hh.shape[0], dtype=torch.float64)
    b_hh = _f64(bias_hh) if bias_hh is not None else torch.zeros(w_hh.shape[0], dtype=torch.float64)
    batch = len(amplitudes)
    pulse = torch.tensor(amplitudes, dtype=torch.float64)[:, None] * torch.ones(batch, d, dtype=torch.float64)
    pre_i0 = pulse @ w_ih.T + b_ih                       # (B, G*N), the input part at t = 0
    pre_i = b_ih.expand(batch, -1)                       # (B, G*N), afterwards
    h = torch.zeros(batch, n, dtype=torch.float64)       # (B, N)
    c = torch.zeros(batch, n, dtype=torch.float64)
    out = []
    for t in range(steps + 1):
        h, c = _cell_step(cell, nonlinearity, pre_i0 if t == 0 else pre_i, h @ w_hh.T + b_hh, h, c)
        out.append(h)
        if stop_when_equal and t > 0 and bool((h == h[:1]).all()) and bool((c == c[:1]).all()):
            break
    return torch.stack(out)  # (T, B, N)


def pulse_response(weight_hh: Tensor, weight_ih: Tensor, bias_ih: Optional[Tensor] = None,
                   bias_hh: Optional[Tensor] = None, *, cell: str = "RNN", nonlinearity: str = "tanh",
                   steps: int = 100) -> Tensor:
    """Hidden state of one recurrent layer driven by a unit pulse: an input vector of ones at
    ``t = 0``, then zero input for ``steps`` steps, from a zero state (the paper's section 3.2).

    ``cell`` is ``RNN`` (with ``nonlinearity``), ``LSTM`` or ``GRU`` in PyTorch's gate layout.
    Returns the hidden states ``(steps + 1, N)``, row t after the input of step t. The biases act
    at every step; :func:`pulse_deviation` takes their effect out.
    """
    return _run_pulses(weight_hh, weight_ih, bias_ih, bias_hh, (1.0,), cell, nonlinearity, steps)[:, 0]


def pulse_deviation(weight_hh: Tensor, weight_ih: Tensor, bias_ih: Optional[Tensor] = None,
                    bias_hh: Optional[Tensor] = None, *, cell: str = "RNN", nonlinearity: str = "tanh",
                    steps: int = 100) -> Tensor:
    """What the pulse adds to the hidden state: :func:`pulse_response` minus the response of the
    same layer to zero input (the biases alone), ``(T, N)``.

    Biases drive every unit at every step; without this subtraction a unit's peak time is that of
    its bias-driven drift, not of the pulse (a chain of 256 units with non-zero biases then loses
    its order). Runs ``max(steps, N)`` steps, so that a pulse can cross a chain of N units, and
    stops early once both runs are in the same state (the pulse has died out exactly): then
    ``T <= max(steps, N) + 1``. A unit the pulse never reaches stays exactly 0.
    """
    n = weight_hh.shape[1]
    runs = _run_pulses(weight_hh, weight_ih, bias_ih, bias_hh, (0.0, 1.0), cell, nonlinearity,
                       max(steps, n), stop_when_equal=True)   # (T, 2, N)
    return runs[:, 1] - runs[:, 0]


def peak_order(activity: Tensor, jitter: float = 1e-3,
               generator: Optional[torch.Generator] = None, absolute: bool = False) -> Tensor:
    """Units ordered by the time of their peak activity (Rajan et al. 2016).

    ``activity`` is ``(T, N)``; ``absolute`` ranks by ``|activity|`` (for :func:`pulse_deviation`,
    where a pulse may push a unit down as well as up). Ties (units peaking at the same step) are
    broken by adding ``U[0, jitter)`` to the peak times, drawn from ``generator``. With
    ``absolute``, units that never deviate from zero (the pulse never reaches them) come last, in
    the order of their jitter. Returns a permutation ``order`` of length N: ``order[0]`` peaks
    first.
    """
    if activity.dim() != 2:
        raise ValueError(f"activity must be (T, N), got shape {tuple(activity.shape)}")
    a = _f64(activity)
    if absolute:
        a = a.abs()
    peak = a.argmax(dim=0).to(torch.float64)  # (N,)
    if absolute:
        peak[(a == 0).all(dim=0)] = float(a.shape[0])
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
    return _profile(w[order][:, order])


def _profile(p: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean of ``p[i, j]`` per offset ``i - j``: every entry counted once, ``N - |k|`` per offset."""
    n = p.shape[-1]
    idx = torch.arange(n)
    diff = (idx[:, None] - idx[None, :] + (n - 1)).flatten()      # (N*N,), offset + N - 1
    offsets = torch.arange(-(n - 1), n)
    sums = torch.zeros(2 * n - 1, dtype=torch.float64).index_add_(0, diff, p.flatten())
    return offsets, sums / (n - offsets.abs()).to(torch.float64)


class ShuffledNull(NamedTuple):
    """The weight profile of the same matrix with its units in random orders."""
    offsets: Tensor  # (K,) the offsets i - j computed
    mean: Tensor     # (K,) mean profile over the random orders, per offset
    std: Tensor      # (K,) its standard deviation (ddof = 1) over the random orders
    samples: int


def _diagonal_mean(w: Tensor, order: Tensor, k: int) -> Tensor:
    """Mean of ``p[i, j] = w[order[i], order[j]]`` over ``i - j = k``, without forming p."""
    n = order.numel()
    if k >= 0:
        return w[order[k:], order[:n - k]].mean()
    return w[order[:n + k], order[-k:]].mean()


def shuffled_profiles(w: Tensor, samples: int = 100, generator: Optional[torch.Generator] = None,
                      offsets: Optional[Sequence[int]] = None) -> ShuffledNull:
    """Null distribution of :func:`weight_profile`: the same matrix, the units in ``samples``
    uniformly random orders. A peak order that found real sequential structure puts the profile
    at ``i - j = +1`` far above this null (``(p(+1) - mean) / std`` of many standard deviations); a
    matrix without it (a random normal matrix, say) stays within it.

    ``offsets`` limits the work to those offsets (O(N) each per sample instead of O(N^2) for
    the whole profile); None computes all ``-(N-1) .. N-1``."""
    w = _f64(w)
    n = w.shape[0]
    if samples < 2:
        raise ValueError(f"the shuffled null needs samples >= 2, got {samples}")
    ks = torch.arange(-(n - 1), n) if offsets is None else torch.as_tensor(list(offsets), dtype=torch.long)
    if bool((ks.abs() >= n).any()):
        raise ValueError(f"offsets must lie in -(N-1) .. N-1 = {-(n - 1)} .. {n - 1}")
    rows = []
    for _ in range(samples):
        o = torch.randperm(n, generator=generator)
        if offsets is None:
            rows.append(_profile(w[o][:, o])[1])
        else:
            rows.append(torch.stack([_diagonal_mean(w, o, int(k)) for k in ks]))
    profiles = torch.stack(rows)                                          # (samples, K)
    return ShuffledNull(ks, profiles.mean(dim=0), profiles.std(dim=0), samples)


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
