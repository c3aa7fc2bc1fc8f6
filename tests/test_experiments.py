"""The theory experiment commands print their tables and write their figures."""

import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "awd_nonnormal.experiments", *args],
                          capture_output=True, text=True)


def test_memory_command(tmp_path):
    out = run("memory", "--n", "30", "--k-max", "40", "--seed", "2", "--out", str(tmp_path / "m.png"))
    assert out.returncode == 0, out.stderr
    lines = {l.split()[0]: l.split() for l in out.stdout.splitlines() if l.split()}
    assert float(lines["identity"][2]) == pytest.approx(1.0, abs=1e-3)
    assert float(lines["orthogonal"][2]) == pytest.approx(1.0, abs=1e-3)
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decoding_command(tmp_path):
    out = run("decoding", "--n", "20", "--steps", "20", "--trials", "60", "--heldout-trials", "200",
              "--out", str(tmp_path / "d.png"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("chain") >= 7 and out.stdout.count("orthogonal") >= 7
    assert (tmp_path / "d.png").stat().st_size > 1000


def test_bad_arguments_are_clean_errors(tmp_path):
    out = run("memory", "--lam", "1.2", "--out", str(tmp_path / "m.png"))
    assert out.returncode == 2 and "spectral radius" in out.stderr and "Traceback" not in out.stderr
    out = run("decoding", "--trials", "0")
    assert out.returncode == 2 and "must be positive" in out.stderr
    # --heldout-trials is split in halves, one to fit and one to score (an R^2 needs 2 trials)
    for n in ("1", "3"):
        out = run("decoding", "--heldout-trials", n, "--out", str(tmp_path / "d.png"))
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "--heldout-trials must be at least 4" in lines[0]
        assert out.stdout == "" and not (tmp_path / "d.png").exists()


def test_an_output_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    out = run("memory", "--n", "10", "--out", str(tmp_path / "file" / "m.png"))
    assert out.returncode == 2, out.stderr  # usage error (awd_nonnormal.cli.EXIT_USAGE)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--out" in lines[0] and "Traceback" not in out.stderr
    assert out.stdout == ""  # refused before the work


def test_memory_pulse_norms_keep_float64_range():
    """A chain with alpha = 3 carries the source pulse to unit k as 3^k e_k, so ||W^k e_0|| = 3^k:
    1.7e47 at k = 99, beyond float32's range (the norms were once stored as float32: inf)."""
    import torch

    from awd_nonnormal.experiments import MemoryConfig, memory_curves

    curves = {c.name: c for c in memory_curves(MemoryConfig(n=100, k_max=100, alpha=3.0))}
    pulse = curves["chain"].pulse
    assert pulse.dtype == torch.float64 and bool(torch.isfinite(pulse).all())
    expected = torch.tensor([3.0 ** k for k in range(100)], dtype=torch.float64)
    torch.testing.assert_close(pulse, expected, rtol=1e-12, atol=0)


def test_decoding_config_needs_two_trials_in_each_held_out_half():
    from awd_nonnormal.experiments import DecodingConfig

    with pytest.raises(ValueError, match="at least 4"):
        DecodingConfig(heldout_trials=3)
    assert DecodingConfig(heldout_trials=4).heldout_trials == 4
