"""Language models that train out of the box: the defaults of --model RNN, the learning-rate
warm-up, the exploding-loss warning, tokens per second and the tied --nhid warning. Corpora are
written by the tests (PTB format), one thread."""

import json
import logging
import math
import random
import sys
from pathlib import Path

import pytest

from awd_nonnormal import lm
from awd_nonnormal.lm import TrainConfig, explosion_threshold, run, warmup_factor
from awd_nonnormal.model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import main  # noqa: E402

sys.path.pop(0)


def write_bigram_corpus(folder, tokens=(400_000, 10_000, 2_000), vocab=30, seed=0):
    """PTB-format word corpus of a sparse bigram language: each word is followed by its fixed
    successor with probability 0.9 and by a uniform draw otherwise, so a model that learns the
    bigram scores far below the uniform ln V."""
    rng = random.Random(seed)
    successor = [rng.randrange(vocab) for _ in range(vocab)]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    w = 0
    for split, n in zip(("train", "valid", "test"), tokens):
        lines, count = [], 0
        while count < n:
            line = []
            for _ in range(rng.randint(5, 15)):
                w = successor[w] if rng.random() < 0.9 else rng.randrange(vocab)
                line.append(f"w{w}")
            lines.append(" ".join(line))
            count += len(line) + 1
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return str(folder)


def write_char_corpus(folder, chars=(60_000, 3_000, 1_000), seed=0):
    """PTB-char-format corpus (characters separated by spaces, ``_`` between words) of random
    sentences over a small lexicon."""
    rng = random.Random(seed)
    lexicon = ["the", "a", "market", "stock", "rose", "fell", "shares", "of", "company", "in",
               "year", "said", "n", "million", "to", "and", "investors", "price", "new", "its"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "valid", "test"), chars):
        lines, count = [], 0
        while count < n:
            words = [rng.choice(lexicon) for _ in range(rng.randint(4, 12))]
            line = " _ ".join(" ".join(word) for word in words)
            lines.append(line)
            count += len(line.split()) + 1
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return str(folder)


def metrics_of(folder):
    (path,) = Path(folder).glob("runs/*/model.metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------- defaults of --model RNN


def test_rnn_defaults_are_the_papers_and_explicit_flags_win():
    parser = main.build_parser()
    argv = ["--model", "RNN", "--lr", "0.01", "--dropouti", "0.3"]
    args = parser.parse_args(argv)
    applied = main.apply_model_defaults(args, main.explicit_fields(argv))
    model, train = main.configs_from_args(args)
    assert train.optimizer == "adam" and train.lr == 0.01
    assert (model.dropout, model.dropouth, model.dropouti, model.dropoute, model.wdrop) == (0.1, 0.1, 0.3, 0.1, 0.1)
    assert model.nonlinearity == main.MODEL_DEFAULTS["RNN"]["nonlinearity"]
    assert "--optimizer adam" in applied and not any(a.startswith(("--lr ", "--dropouti ")) for a in applied)
    # LSTM (and GRU) keep awd-lstm-lm's defaults
    for cell in ("LSTM", "GRU"):
        args = parser.parse_args(["--model", cell])
        assert main.apply_model_defaults(args, main.explicit_fields(["--model", cell])) == []
        model, train = main.configs_from_args(args)
        assert (train.optimizer, train.lr, model.dropouti, model.wdrop) == ("sgd", 30.0, 0.65, 0.5)


def test_headline_command_learns(tmp_path, monkeypatch, caplog):
    """`main.py --data D --model RNN --init fbchain` with --epochs 1 and a small model, nothing
    else: the validation loss ends far below the uniform guess ln V."""
    data = write_bigram_corpus(tmp_path / "bigram")
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO)
    rc = main.main(["--data", data, "--model", "RNN", "--init", "fbchain", "--epochs", "1",
                    "--emsize", "64", "--nhid", "64"])
    assert rc == 0
    assert "--model RNN defaults: --optimizer adam" in caplog.text
    (record,) = metrics_of(tmp_path)
    ln_v = math.log(31)  # 30 words and <eos>
    assert record["val_loss"] < ln_v - 0.5, (record, ln_v)
    assert record["exploded_batches"] == 0


# ---------------------------------------------------------------------- warm-up


def test_warmup_factor_is_linear_then_one():
    assert [warmup_factor(k, 4) for k in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(1, 0) == 1.0
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(warmup=-1)


def test_trainer_applies_the_warmup_across_epochs(tmp_path, monkeypatch):
    """Each optimizer step k runs at lr * seq_len / bptt * min(1, k / warmup), counted over the
    whole run (the second epoch goes on where the first stopped)."""
    data = write_bigram_corpus(tmp_path / "c", tokens=(3_000, 500, 200), vocab=10)
    seen_lr, seen_len = [], []
    real_step, real_get_batch = lm.torch.optim.Adam.step, lm.get_batch

    def step(self, *a, **k):
        seen_lr.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    def get_batch(source, i, seq_len):
        x, y = real_get_batch(source, i, seq_len)
        if source.size(1) == 4:  # the training stream (batch 4), not validation (batch 2)
            seen_len.append(x.size(0))
        return x, y

    monkeypatch.setattr(lm.torch.optim.Adam, "step", step)
    monkeypatch.setattr(lm, "get_batch", get_batch)
    mc = ModelConfig(rnn_type="RNN", emsize=8, nhid=8, nlayers=1, dropout=0, dropouth=0, dropouti=0,
                     dropoute=0, wdrop=0)
    tc = TrainConfig(data=data, batch_size=4, bptt=20, lr=0.01, optimizer="adam", warmup=60, epochs=2,
                     save=str(tmp_path / "r" / "model.pt"), progress=False, eval_batch_size=2)
    result = run(mc, tc)
    batches = [json.loads(line)["batches"] for line in result.paths.metrics.read_text().splitlines()]
    assert len(batches) == 2 and batches[0] < 60 < sum(batches)  # the warm-up spans the epoch boundary
    assert len(seen_lr) == len(seen_len) == sum(batches)
    for k, (got, length) in enumerate(zip(seen_lr, seen_len), start=1):
        assert got == pytest.approx(0.01 * length / 20 * min(1.0, k / 60), rel=1e-12), k
