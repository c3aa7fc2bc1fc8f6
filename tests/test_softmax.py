"""The adaptive softmax: a proper distribution over the vocabulary, the full softmax as its
one-cluster case, AWD-LSTM's cut-off rule, old checkpoints, and a training run with it."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from awd_nonnormal import lm
from awd_nonnormal.checkpoint import load_checkpoint
from awd_nonnormal.model import ModelConfig, RNNModel
from awd_nonnormal.softmax import resolve_cutoffs

V = 50


def model(cutoffs, **kw):
    c = dict(rnn_type="LSTM", ntoken=V, emsize=8, nhid=12, nlayers=2, cutoffs=cutoffs)
    c.update(kw)
    torch.manual_seed(0)
    return RNNModel(ModelConfig(**c)).eval()


def outputs(m, T=5, B=3):
    x = torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(1))
    out, _ = m(x, m.init_hidden(B), decode=False)  # (T, B, E)
    return out


@pytest.mark.parametrize("cutoffs", [(10,), (5, 20, 40)])
def test_log_probs_sum_to_one_and_match_the_loss(cutoffs):
    m = model(cutoffs, emsize=64)  # tail projections 16, 4, 1
    out = outputs(m)
    logp = m.log_probs(out)  # (T, B, V)
    assert logp.shape == (5, 3, V)
    assert torch.allclose(logp.double().exp().sum(-1), torch.ones(5, 3, dtype=torch.float64), atol=1e-5)
    targets = torch.randint(0, V, (15,), generator=torch.Generator().manual_seed(2))
    gathered = -logp.view(15, V).gather(1, targets[:, None])[:, 0]
    assert torch.allclose(m.nll(out, targets), gathered, atol=1e-5)
    # forward(decode=True) returns log-probabilities, which cross_entropy treats as logits
    assert torch.allclose(F.cross_entropy(logp.view(15, V), targets, reduction="none"), gathered, atol=1e-5)


def test_one_cluster_is_the_full_softmax():
    """With one tail cluster of a single word, the head's V outputs are the V words' logits, so
    the loss is the full softmax's cross-entropy with the head as the decoder."""
    m = model((V - 1,))
    out = outputs(m).view(15, -1)
    head = m.decoder.head
    assert head.weight.shape == (V, out.size(1))
    targets = torch.arange(15) * 3 % V
    targets[0] = V - 1  # the word in the tail cluster
    full = F.cross_entropy(F.linear(out, head.weight, head.bias), targets, reduction="none")
    assert torch.allclose(m.nll(out, targets), full, atol=1e-6)


def test_auto_cutoffs_follow_awd_lstm_and_the_embedding_is_not_tied():
    assert resolve_cutoffs(None, 10_000) == ()
    assert resolve_cutoffs(None, 75_000) == ()
    assert resolve_cutoffs(None, 267_735) == (2800, 20000, 76000)
    assert resolve_cutoffs(None, 793_471) == (4200, 35000, 180000)
    assert resolve_cutoffs((), 267_735) == ()
    with pytest.raises(ValueError, match="fewer cut-offs"):
        model((10, 30), emsize=8)  # tail projections 2, then 0
    m = model((10,), tied=True)
    assert m.config.hidden_sizes[-1] == 8  # tied still sizes the last layer to emsize
    assert all(p is not m.encoder.weight for p in m.decoder.parameters())
    full = model(None)  # auto at V = 50: the full softmax, tied
    assert full.config.cutoffs == () and full.decoder.weight is full.encoder.weight


def test_a_config_written_before_cutoffs_means_the_full_softmax():
    d = ModelConfig(ntoken=100_000, emsize=64, nhid=4, nlayers=1).to_dict()
    del d["cutoffs"]
    assert ModelConfig.from_dict(d).resolved_cutoffs == ()
    assert ModelConfig.from_dict({**d, "cutoffs": [10, 20]}).cutoffs == (10, 20)


def test_training_with_the_adaptive_softmax(tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    words = [f"w{i}" for i in range(40)]
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 80), ("valid", 20), ("test", 20)):
        lines = [" ".join(words[j] for j in torch.randint(0, 40, (6,), generator=g).tolist()) for _ in range(n)]
        (data / f"{split}.txt").write_text("\n".join(lines) + "\n")
    mcfg = ModelConfig(rnn_type="LSTM", emsize=16, nhid=12, nlayers=2, cutoffs=(8, 20), wdrop=0.1)
    tcfg = lm.TrainConfig(data=str(data), batch_size=4, eval_batch_size=2, bptt=8, lr=5.0, epochs=2,
                          save=str(tmp_path / "run" / "model.pt"), progress=False, device="cpu")
    result = lm.run(mcfg, tcfg)
    assert result.test_loss is not None
    ckpt = load_checkpoint(result.paths.best, kind="lm")
    assert ckpt["config"]["model"]["cutoffs"] == [8, 20]
    rebuilt = RNNModel.from_checkpoint(ckpt)
    assert isinstance(rebuilt.decoder, torch.nn.AdaptiveLogSoftmaxWithLoss)
    # the test loss recorded is the evaluation of the rebuilt model
    from awd_nonnormal.data import batchify, load_corpus
    corpus = load_corpus(str(data))
    ev = lm.evaluate(rebuilt, batchify(corpus.test, 1), 1, 8)
    assert ev == pytest.approx(result.test_loss, rel=1e-6)
    with pytest.raises(ValueError, match="below the vocabulary size") as info:  # a flag out of range: exit 2
        lm.run(dataclasses.replace(mcfg, cutoffs=(8, 500)),
               dataclasses.replace(tcfg, save=str(tmp_path / "other" / "m.pt")))
    assert not isinstance(info.value, lm.LMError)
