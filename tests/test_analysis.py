"""Pure measures against closed forms: Henrici index, weight profiles, Fisher memory, decoding."""

import math

import pytest
import torch

from awd_nonnormal import analysis as A
from awd_nonnormal.experiments import CONDITIONS, DecodingConfig, MemoryConfig, linear_decoding, memory_curves
from awd_nonnormal.init import chain_, fbchain_, identity_, orthogonal_, ramp_

F64 = torch.float64


def mat(n, fn, **kw):
    return fn(torch.empty(n, n, dtype=F64), **kw)


def e0(n):
    v = torch.zeros(n, dtype=F64)
    v[0] = 1.0
    return v


# ---------------------------------------------------------------- Henrici

@pytest.mark.parametrize("n", [5, 40])
def test_henrici_zero_for_normal_matrices(n):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=g, dtype=F64)
    for w in (torch.eye(n, dtype=F64), 3 * torch.eye(n, dtype=F64),
              mat(n, orthogonal_, scale=1.3, generator=g), a + a.T, a - a.T):
        h = A.henrici_index(w)
        assert h.raw == pytest.approx(0.0, abs=1e-6) and h.normalized == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("n,alpha", [(2, 1.0), (10, 0.5), (100, 1.02)])
def test_henrici_of_chain(n, alpha):
    h = A.henrici_index(mat(n, chain_, alpha=alpha))
    assert h.raw == pytest.approx(math.sqrt(n - 1) * alpha, rel=1e-9)
    assert h.normalized == pytest.approx(1.0, rel=1e-9)  # all eigenvalues are 0


def test_henrici_of_triangular_matrix():
    """Upper triangular: eigenvalues on the diagonal, so d^2 = sum of off-diagonal squares."""
    w = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0], [0.0, 0.0, 0.5]], dtype=F64)
    assert A.henrici_index(w).raw == pytest.approx(math.sqrt(4 + 9 + 16), rel=1e-10)
    with pytest.raises(ValueError, match="square"):
        A.henrici_index(torch.zeros(2, 3))


def test_spectral_radius():
    assert A.spectral_radius(mat(7, orthogonal_, scale=0.9)) == pytest.approx(0.9, rel=1e-10)
    assert A.spectral_radius(mat(7, chain_, alpha=2.0)) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- weight profiles

def test_chain_pulse_peaks_in_order_and_profile_peaks_at_plus_one():
    n = 12
    w = mat(n, chain_)
    v = 0.9 * torch.eye(n, 3, dtype=F64)
    act = A.pulse_response(w, v, cell="RNN", nonlinearity="linear", steps=30)   # (31, N)
    # the ones-pulse enters units 0..2 at t = 0 (source input), so units 0, 1, 2 tie at t = 0 and
    # unit k >= 2 peaks at step k - 2
    order = A.peak_order(act, generator=torch.Generator().manual_seed(0))
    assert order[3:].tolist() == list(range(3, n))
    offsets, prof = A.weight_profile(w, torch.arange(n))
    assert offsets[prof.argmax()].item() == 1
    assert prof[offsets == 1].item() == pytest.approx(1.0)  # every (i, i-1) pair holds alpha = 1
    assert prof[offsets != 1].abs().max().item() == 0.0


def test_weight_profile_follows_the_order():
    """Reversing the order mirrors the profile: the chain's peak moves to i - j = -1."""
    n = 9
    w = mat(n, chain_, alpha=2.0)
    offsets, prof = A.weight_profile(w, torch.arange(n).flip(0))
    assert offsets[prof.argmax()].item() == -1
    # the ramp profile is eps * k / (N-1) for offset k in the index order
    offsets, prof = A.weight_profile(mat(n, ramp_, eps=0.08), torch.arange(n))
    assert torch.allclose(prof, 0.08 * offsets.to(F64) / (n - 1))


def test_peak_order_breaks_ties_with_seeded_jitter():
    act = torch.zeros(5, 6)
    act[2, :] = 1.0  # every unit peaks at t = 2
    a = A.peak_order(act, generator=torch.Generator().manual_seed(1))
    b = A.peak_order(act, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(6))
    act[4, 3] = 5.0  # unit 3 now peaks last
    assert A.peak_order(act, generator=torch.Generator().manual_seed(1))[-1].item() == 3


@pytest.mark.parametrize("cell,gates", [("LSTM", 4), ("GRU", 3)])
def test_pulse_response_matches_torch_cells(cell, gates):
    torch.manual_seed(0)
    mod = getattr(torch.nn, cell)(3, 5).double()
    x = torch.zeros(8, 1, 3, dtype=F64)
    x[0] = 1.0
    want, _ = mod(x)
    got = A.pulse_response(mod.weight_hh_l0, mod.weight_ih_l0, mod.bias_ih_l0, mod.bias_hh_l0, cell=cell, steps=7)
    assert torch.allclose(got, want[:, 0], atol=1e-12)


# ---------------------------------------------------------------- Fisher memory

@pytest.mark.parametrize("seed", [0, 1])
def test_fisher_total_is_one_for_normal_matrices(seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(100, generator=g, dtype=F64)
    for w in (mat(100, orthogonal_, scale=0.99, generator=g), mat(100, identity_, scale=0.99)):
        fm = A.fisher_memory_curve(w, v, 50)
        assert fm.J_tot == pytest.approx(1.0, abs=1e-6)
        # for lambda * (orthogonal), J(k) = (1 - lambda^2) lambda^(2k)
        k = torch.arange(50, dtype=F64)
        assert torch.allclose(fm.J, (1 - 0.99 ** 2) * 0.99 ** (2 * k), rtol=1e-8)


@pytest.mark.parametrize("alpha", [0.9, 1.0, 1.05, 1.5])
def test_fisher_curve_of_chain_closed_form(alpha):
    """Chain with v = e_0: C is diagonal, J(k) = alpha^(2k) / sum_{m<=k} alpha^(2m) for k < N, 0 after."""
    n = 30
    fm = A.fisher_memory_curve(mat(n, chain_, alpha=alpha), e0(n), n + 5)
    want = [alpha ** (2 * k) / sum(alpha ** (2 * m) for m in range(k + 1)) for k in range(n)] + [0.0] * 5
    assert torch.allclose(fm.J, torch.tensor(want, dtype=F64), rtol=1e-10, atol=1e-14)
    assert fm.J_tot == pytest.approx(sum(want), rel=1e-10)
    if alpha == 1.0:
        assert fm.J[:n].tolist() == pytest.approx([1 / (k + 1) for k in range(n)])


def test_fisher_total_bounded_by_n_and_growing_with_alpha():
    n = 50
    totals = [A.fisher_memory_curve(mat(n, chain_, alpha=a), e0(n), 1).J_tot for a in (0.5, 1.0, 1.2, 2.0, 4.0)]
    assert all(t <= n for t in totals)
    assert totals == sorted(totals) and totals[-1] > 0.9 * n
    g = torch.Generator().manual_seed(5)
    for _ in range(5):  # random matrices (scaled to radius 0.95) and random v
        w = torch.randn(n, n, generator=g, dtype=F64)
        w *= 0.95 / A.spectral_radius(w)
        assert A.fisher_memory_curve(w, torch.randn(n, generator=g, dtype=F64), 1).J_tot <= n + 1e-9
    assert A.fisher_memory_curve(mat(n, fbchain_, alpha=1.0, beta=0.1), e0(n), 1).J_tot <= n


def test_fisher_rejects_divergent_networks():
    with pytest.raises(ValueError, match="spectral radius"):
        A.fisher_memory_curve(mat(10, identity_, scale=1.01), e0(10), 5)


# ---------------------------------------------------------------- decoding

def test_decoding_recovers_a_linear_function_exactly():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 5, generator=g, dtype=F64)
    s = h @ torch.tensor([1.0, -2.0, 0.0, 0.5, 3.0], dtype=F64) + 4.0
    r = A.decoding_r2(h[:150], s[:150], h[150:], s[150:])
    assert r.in_sample == pytest.approx(1.0) and r.held_out == pytest.approx(1.0)
    noise = torch.randn(300, generator=g, dtype=F64)
    r = A.decoding_r2(h[:150], noise[:150], h[150:], noise[150:])
    assert r.held_out < 0.1


def test_linear_decoding_chain_beats_orthogonal():
    """Figure 2 / Appendix A with a fixed seed: both ~1 without noise or non-linearity; the chain
    ahead in every noisy and every non-linear condition (in sample, as the paper reports; held out
    where there is signal left to decode: at sigma = 1 both are ~0 held out)."""
    rows = linear_decoding(DecodingConfig(trials=250, heldout_trials=2000, seed=0))
    r = {(x.nonlinearity, x.noise, x.model): x for x in rows}
    assert len(rows) == 2 * len(CONDITIONS)
    for model in ("chain", "orthogonal"):
        assert r[("linear", 0.0, model)].in_sample > 0.999
        assert r[("linear", 0.0, model)].held_out > 0.999
    for nl, noise in CONDITIONS[1:]:
        chain, orth = r[(nl, noise, "chain")], r[(nl, noise, "orthogonal")]
        assert chain.in_sample > orth.in_sample, (nl, noise)
        if noise < 1.0:
            assert chain.held_out > orth.held_out, (nl, noise)
    for nl in ("elu", "tanh", "relu"):  # an independent simulation gave ~0.7 vs ~0 held out
        assert r[(nl, 0.0, "chain")].held_out > 0.5
        assert r[(nl, 0.0, "orthogonal")].held_out < 0.2


def test_memory_curves_experiment():
    curves = {c.name: c for c in memory_curves(MemoryConfig(n=40, k_max=60))}
    assert curves["identity"].J_tot == pytest.approx(1.0, abs=1e-6)
    assert curves["orthogonal"].J_tot == pytest.approx(1.0, abs=1e-6)
    assert 1.5 < curves["chain"].J_tot <= 40 and 1.5 < curves["fbchain"].J_tot <= 40
    assert curves["chain"].J[40:].abs().max() == 0  # the chain forgets abruptly after N steps
    assert curves["chain"].pulse[39] == pytest.approx(1.05 ** 39)  # transient amplification


# ---------------------------------------------------------------- profiles that find a chain

def chain_layer(n, alpha=1.0, d=1):
    """A chain of n units fed at unit 0 (source input 0.9 e_0), as in the paper's section 3.1.1
    (V = 0.9 I), the direction tests/test_init.py pins."""
    return mat(n, chain_, alpha=alpha), 0.9 * torch.eye(n, d, dtype=F64)


def test_peak_order_ignores_a_unit_driven_by_bias_alone():
    """Unit 0 gets no input and no recurrent weight, only a bias: tanh(2) at every step from
    t = 0. The raw response peaks it first; the deviation from the bias-only run never moves it,
    so it comes last and the chain 1..N-1 keeps its order."""
    n = 12
    w = torch.zeros(n, n, dtype=F64)
    w[2:, 1:-1] = mat(n - 1, chain_)[1:, :-1]        # chain 1 -> 2 -> ... -> n-1
    v = torch.zeros(n, 1, dtype=F64)
    v[1] = 0.9
    b = torch.zeros(n, dtype=F64)
    b[0] = 2.0
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    raw = A.peak_order(A.pulse_response(w, v, b, cell="RNN", nonlinearity="tanh", steps=30), generator=gen())
    assert 0 in raw[:2].tolist()                     # the old procedure: peaks at t = 0 with the input unit
    dev = A.pulse_deviation(w, v, b, cell="RNN", nonlinearity="tanh", steps=30)
    assert dev[:, 0].abs().max() == 0
    order = A.peak_order(dev, generator=gen(), absolute=True)
    assert order.tolist() == list(range(1, n)) + [0]


@pytest.mark.parametrize("nonlinearity", ["tanh", "linear"])
def test_chain_of_256_with_random_biases_peaks_at_plus_one(nonlinearity):
    """Random non-zero biases drive every unit at every step; 256 units need 256 steps."""
    n = 256
    w, v = chain_layer(n)
    g = torch.Generator().manual_seed(3)
    b_ih = (torch.rand(n, generator=g, dtype=F64) - 0.5) * 0.2
    b_hh = (torch.rand(n, generator=g, dtype=F64) - 0.5) * 0.2
    assert (b_ih + b_hh).abs().min() > 0
    dev = A.pulse_deviation(w, v, b_ih, b_hh, cell="RNN", nonlinearity=nonlinearity, steps=100)
    assert dev.shape[0] >= n                                     # ran at least N steps
    assert dev.abs().argmax(dim=0).tolist() == list(range(n))   # unit k peaks at step k
    order = A.peak_order(dev, generator=torch.Generator().manual_seed(0), absolute=True)
    offsets, prof = A.weight_profile(w, order)
    assert offsets[prof.argmax()].item() == 1 and prof[offsets == 1].item() == pytest.approx(1.0)


def test_pulse_deviation_stops_once_the_pulse_has_died_out():
    """A chain is nilpotent: after N steps both runs are in the same state and stay there."""
    n = 20
    w, v = chain_layer(n)
    dev = A.pulse_deviation(w, v, torch.full((n,), 0.3, dtype=F64), cell="RNN", nonlinearity="tanh", steps=500)
    assert n <= dev.shape[0] - 1 < 500 and dev[-1].abs().max() == 0


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_pulse_deviation_of_gated_cells_matches_torch(cell):
    """Pulse run minus zero-input run, computed independently with torch's own modules."""
    torch.manual_seed(1)
    mod = getattr(torch.nn, cell)(3, 6).double()
    x = torch.zeros(10, 2, 3, dtype=F64)
    x[0, 1] = 1.0                                    # batch 0: zero input, batch 1: the pulse
    out, _ = mod(x)
    got = A.pulse_deviation(mod.weight_hh_l0, mod.weight_ih_l0, mod.bias_ih_l0, mod.bias_hh_l0, cell=cell, steps=9)
    assert got.shape[0] == 10
    assert torch.allclose(got, out[:, 1] - out[:, 0], atol=1e-12)


def shuffled_z(w, order, samples=200, seed=0):
    offsets, prof = A.weight_profile(w, order)
    null = A.shuffled_profiles(w, samples, torch.Generator().manual_seed(seed))
    k = offsets == 1
    return offsets, prof, ((prof[k] - null.mean[k]) / null.std[k]).item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_normal_matrix_shows_no_plus_one_peak_against_its_shuffled_null(seed):
    """Random orthogonal and random symmetric matrices (normal, no sequence in them), ordered by
    the peak of a pulse entering every unit: p(+1) stays within 3 null standard deviations."""
    n = 100
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, 1, generator=g, dtype=F64) * 0.9 / math.sqrt(n)
    a = torch.randn(n, n, generator=g, dtype=F64) / math.sqrt(2 * n)
    for w in (mat(n, orthogonal_, generator=g), a + a.T):
        dev = A.pulse_deviation(w, v, cell="RNN", nonlinearity="tanh")
        order = A.peak_order(dev, generator=torch.Generator().manual_seed(0), absolute=True)
        assert abs(shuffled_z(w, order)[2]) < 3


def test_shuffled_null_is_the_mean_off_diagonal_weight():
    """Over uniformly random orders every off-diagonal offset averages the mean off-diagonal entry."""
    n = 7
    w = torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=F64)
    null = A.shuffled_profiles(w, 4000, torch.Generator().manual_seed(1))
    off_mean = (w.sum() - w.diagonal().sum()) / (n * n - n)
    centre = n - 1
    assert null.mean[centre].item() == pytest.approx(w.diagonal().mean().item(), abs=1e-12)  # offset 0
    assert null.std[centre].item() == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(null.mean[torch.arange(2 * n - 1) != centre], off_mean.expand(2 * n - 2), atol=0.05)


@pytest.mark.parametrize("n", [100, 256])
def test_noisy_chain_still_peaks_at_plus_one(n):
    """Chain(alpha = 1) plus i.i.d. Gaussian noise of std 0.1 alpha / sqrt(N): a noise matrix whose
    spectral radius is 10 % of alpha (circular law), with non-zero random biases."""
    alpha = 1.0
    w, v = chain_layer(n, alpha)
    g = torch.Generator().manual_seed(n)
    w = w + 0.1 * alpha / math.sqrt(n) * torch.randn(n, n, generator=g, dtype=F64)
    b = (torch.rand(n, generator=g, dtype=F64) - 0.5) * 0.2
    dev = A.pulse_deviation(w, v, b, cell="RNN", nonlinearity="tanh")
    order = A.peak_order(dev, generator=torch.Generator().manual_seed(0), absolute=True)
    offsets, prof, z = shuffled_z(w, order)
    assert offsets[prof.argmax()].item() == 1
    assert z > 20


# ---------------------------------------------------------------- eigenvalues near a chain

def fbchain_closed_form(n, alpha, beta):
    """Tridiagonal Toeplitz: lambda_k = 2 sqrt(alpha beta) cos(k pi / (N + 1)), k = 1..N."""
    lam = [2 * math.sqrt(alpha * beta) * math.cos(k * math.pi / (n + 1)) for k in range(1, n + 1)]
    fro2 = (n - 1) * (alpha ** 2 + beta ** 2)
    d = math.sqrt(fro2 - math.fsum(x * x for x in lam))
    return d, d / math.sqrt(fro2), max(abs(x) for x in lam)


@pytest.mark.parametrize("n", [64, 256])
def test_henrici_of_fbchain_matches_the_closed_form(n):
    d, dn, rho = fbchain_closed_form(n, 0.99, 0.04)
    sp = A.spectrum(mat(n, fbchain_, alpha=0.99, beta=0.04))
    assert sp.henrici.reliable and sp.radius_reliable
    assert sp.henrici.raw == pytest.approx(d, rel=1e-9)
    assert sp.henrici.normalized == pytest.approx(dn, rel=1e-9)
    assert sp.radius == pytest.approx(rho, rel=1e-9)
    assert A.henrici_index(mat(n, fbchain_, alpha=0.99, beta=0.04)).raw == pytest.approx(d, rel=1e-9)


@pytest.mark.parametrize("n", [64, 256])
def test_henrici_of_a_shuffled_fbchain_is_right_or_marked_unreliable(n):
    """Relabelling the units (P W P^T) keeps the eigenvalues and ||W||_F, so d and rho are the
    closed form's, but the matrix is no longer tridiagonal: the general method must either get
    within 1 % or say that it cannot."""
    d, _, rho = fbchain_closed_form(n, 0.99, 0.04)
    p = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    sp = A.spectrum(mat(n, fbchain_, alpha=0.99, beta=0.04)[p][:, p])
    assert sp.method == "general"
    assert abs(sp.henrici.raw - d) <= 0.01 * d or not sp.henrici.reliable
    assert abs(sp.radius - rho) <= 0.01 * rho or not sp.radius_reliable
    # LAPACK misses here by > 5 % (radius ~0.6-0.9 for 0.398), and the flag says so
    assert abs(sp.henrici.raw - d) > 0.05 * d and not sp.henrici.reliable and not sp.radius_reliable


@pytest.mark.parametrize("n", [10, 256])
def test_exact_values_for_chains_orthogonal_and_symmetric_matrices(n):
    g = torch.Generator().manual_seed(n)
    sp = A.spectrum(mat(n, chain_, alpha=1.02))
    assert sp.henrici.raw == pytest.approx(math.sqrt(n - 1) * 1.02, rel=1e-12) and sp.radius == 0.0
    assert sp.henrici.normalized == pytest.approx(1.0, rel=1e-12) and sp.henrici.reliable
    sp = A.spectrum(mat(n, orthogonal_, scale=0.9, generator=g))
    assert sp.henrici.raw == 0.0 and sp.henrici.reliable
    assert sp.radius == pytest.approx(0.9, rel=1e-10) and sp.radius_reliable
    a = torch.randn(n, n, generator=g, dtype=F64)
    sym = a + a.T
    sp = A.spectrum(sym)
    assert sp.henrici.raw == 0.0 and sp.henrici.reliable and sp.method == "symmetric"
    assert sp.radius == pytest.approx(float(torch.linalg.eigvalsh(sym).abs().max()), rel=1e-12)
    sp = A.spectrum(torch.eye(n, dtype=F64))
    assert sp.henrici.raw == 0.0 and sp.radius == 1.0


def test_general_matrices_are_reliable_when_well_conditioned():
    """A random Gaussian matrix: eigenvalues well conditioned, d from its Schur form's size."""
    n = 60
    w = torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=F64)
    sp = A.spectrum(w)
    ev = torch.linalg.eigvals(w)
    assert sp.method == "general" and sp.henrici.reliable and sp.radius_reliable
    assert sp.henrici.raw == pytest.approx(math.sqrt(float((w ** 2).sum() - (ev.abs() ** 2).sum())), rel=1e-9)
    assert sp.henrici.error < 1e-6 * sp.henrici.raw


def test_tridiagonal_method_agrees_with_lapack_where_lapack_is_accurate():
    """Small tridiagonal matrices with products >= 0 (some exactly 0, one row only feedback):
    same eigenvalues and d(W) as the plain dense computation, which is accurate at N = 6.
    A negative product is left to the general method."""
    w = torch.zeros(6, 6, dtype=F64)
    w.diagonal().copy_(torch.tensor([0.3, -0.2, 0.5, 0.1, 0.0, 0.4], dtype=F64))
    w.diagonal(-1).copy_(torch.tensor([0.9, 0.0, 1.1, 0.7, 0.8], dtype=F64))
    w.diagonal(1).copy_(torch.tensor([0.2, 0.6, 0.3, 0.0, 0.1], dtype=F64))
    sp = A.spectrum(w)
    ev = torch.linalg.eigvals(w)
    assert sp.method == "tridiagonal"
    assert sorted(sp.eigvals.real.tolist()) == pytest.approx(sorted(ev.real.tolist()), abs=1e-12)
    assert ev.imag.abs().max() < 1e-12
    want = math.sqrt(float((w ** 2).sum() - (ev.abs() ** 2).sum()))
    assert sp.henrici.raw == pytest.approx(want, rel=1e-10)
    w[2, 3] = -0.3
    assert A.spectrum(w).method == "general"


def test_shuffled_null_at_chosen_offsets_matches_the_full_null():
    """The same seed gives the same orders, so the O(N) per-offset path equals the full profile's."""
    n = 9
    w = torch.randn(n, n, generator=torch.Generator().manual_seed(2), dtype=F64)
    full = A.shuffled_profiles(w, 50, torch.Generator().manual_seed(3))
    some = A.shuffled_profiles(w, 50, torch.Generator().manual_seed(3), offsets=(1, -2, 0, 8))
    idx = torch.tensor([1, -2, 0, 8]) + n - 1
    assert torch.allclose(some.mean, full.mean[idx], atol=1e-12)
    assert torch.allclose(some.std, full.std[idx], atol=1e-12)
    with pytest.raises(ValueError, match="offsets"):
        A.shuffled_profiles(w, 5, offsets=(9,))
