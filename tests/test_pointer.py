"""The continuous cache pointer: lambda = 0 is exactly the plain evaluation, the cache's
probabilities match a slow loop written here, long repeats get cheaper, and pointer.py."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from awd_nonnormal import lm
from awd_nonnormal.data import batchify
from awd_nonnormal.model import ModelConfig, RNNModel
from awd_nonnormal.pointer import CacheConfig, cache_log_probs, evaluate_with_cache, mix_nll

ROOT = Path(__file__).resolve().parents[1]


def tiny(V=60, cutoffs=(), rnn_type="LSTM", seed=0):
    torch.manual_seed(seed)
    return RNNModel(ModelConfig(rnn_type=rnn_type, ntoken=V, emsize=16, nhid=16, nlayers=2,
                                cutoffs=cutoffs)).eval()


@pytest.mark.parametrize("cutoffs, rnn_type", [((), "LSTM"), ((10, 30), "LSTM"), ((), "QRNN")])
def test_lambda_zero_equals_plain_evaluation_exactly(cutoffs, rnn_type):
    m = tiny(cutoffs=cutoffs, rnn_type=rnn_type)
    ids = torch.randint(0, 60, (157,), generator=torch.Generator().manual_seed(1))
    plain = lm.evaluate(m, batchify(ids, 1), 1, 20)
    r = evaluate_with_cache(m, ids, CacheConfig(lambdasm=0.0, theta=1.0, window=30, bptt=20))
    assert r.tokens == 156
    assert r.plain_loss == plain
    assert r.cache_loss == plain


def test_cache_probabilities_match_a_slow_loop():
    g = torch.Generator().manual_seed(2)
    n, E, window, theta = 23, 5, 6, 0.7
    h = torch.randn(n, E, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 4, (n,), generator=g)
    got = cache_log_probs(h, targets, theta, window, block=4)
    for t in range(n):
        hist = list(range(max(0, t - window), t))
        if not hist:
            assert got[t] == -math.inf
            continue
        scores = torch.stack([theta * h[t] @ h[i] for i in hist])
        attn = torch.softmax(scores, 0)
        p = sum(attn[k] for k, i in enumerate(hist) if targets[i] == targets[t])
        expected = math.log(p) if p else -math.inf
        assert got[t].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # the mixture, (1 - lambda) p_vocab + lambda p_cache
    nll = torch.rand(n, generator=g, dtype=torch.float64) * 3
    mixed = mix_nll(nll, got, 0.25)
    ref = -torch.log(0.75 * torch.exp(-nll) + 0.25 * torch.exp(got))
    assert torch.allclose(mixed, ref, atol=1e-12)


def test_the_first_position_has_no_history_and_scores_p_vocab_alone():
    """ids 3 5 5: position 0 (input 3, target 5) has no history, so its loss is the model's own;
    position 1 (input 5, target 5) has one position of history, followed by 5, so p_cache = 1
    and its loss is -log((1 - lambda) p_vocab + lambda)."""
    from awd_nonnormal.pointer import stream_outputs

    m = tiny(V=10)
    ids = torch.tensor([3, 5, 5])
    _, targets, nll, _ = stream_outputs(m, ids, 20)
    assert targets.tolist() == [5, 5]
    r = evaluate_with_cache(m, ids, CacheConfig(lambdasm=0.5, theta=1.0, window=5, bptt=20))
    expected = (float(nll[0]) - math.log(0.5 * math.exp(-float(nll[1])) + 0.5)) / 2
    assert r.cache_loss == pytest.approx(expected, rel=1e-6)  # float32 losses; 0.5 * log 2 = 0.35 apart otherwise


def test_long_repeats_get_cheaper():
    V = 200
    m = tiny(V=V)
    g = torch.Generator().manual_seed(3)
    block = torch.randperm(V, generator=g)[:40]
    ids = block.repeat(6)  # a 40-token sequence seen 6 times
    r = evaluate_with_cache(m, ids, CacheConfig(lambdasm=0.5, theta=1.0, window=100, bptt=50))
    # even uniform attention gives p_cache = 1/40 once a repeat is in the window (p_vocab ~ 1/200)
    assert r.cache_loss < r.plain_loss - 0.3
    shuffled = torch.randint(0, V, (240,), generator=g)  # no repeats: the cache cannot help much
    s = evaluate_with_cache(m, shuffled, CacheConfig(lambdasm=0.5, theta=1.0, window=100, bptt=50))
    assert s.cache_loss - s.plain_loss > r.cache_loss - r.plain_loss


def test_config_rejects_bad_values():
    for kw in (dict(lambdasm=1.5), dict(window=0), dict(bptt=-1), dict(theta=float("nan"))):
        with pytest.raises(ValueError):
            CacheConfig(**kw)


def train_tiny(tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    for split, n in (("train", 60), ("valid", 15), ("test", 15)):
        (data / f"{split}.txt").write_text("".join(f"a b c d e f {i % 3}\n" for i in range(n)))
    mcfg = ModelConfig(rnn_type="LSTM", emsize=8, nhid=12, nlayers=2)
    tcfg = lm.TrainConfig(data=str(data), batch_size=4, bptt=10, lr=5.0, epochs=1,
                          save=str(tmp_path / "run" / "model.pt"), progress=False, device="cpu")
    return lm.run(mcfg, tcfg).paths.best


def test_pointer_command(tmp_path):
    ckpt = train_tiny(tmp_path)
    out = subprocess.run([sys.executable, "pointer.py", "--save", str(ckpt), "--window", "40",
                          "--bptt", "30", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.split()}
    assert {"valid", "test"} <= set(rows)
    bad = subprocess.run([sys.executable, "pointer.py", "--save", str(ckpt), "--lambdasm", "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "lambdasm" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run([sys.executable, "pointer.py", "--save", str(tmp_path / "none.pt")], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no such file" in missing.stderr and "Traceback" not in missing.stderr
