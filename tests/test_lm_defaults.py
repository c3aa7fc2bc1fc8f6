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
from awd_nonnormal.init import InitOptions
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
    assert record["val_loss"] < ln_v - 0.75, (record, ln_v)  # measured 2.40 against ln V = 3.43
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


# ---------------------------------------------------------------------- first steps, warnings


def first_run_model(**changes):
    """The model of the README's first-run command (`--model RNN --init fbchain --nlayers 1
    --emsize 128`, tied: 128 units) with the defaults of --model RNN."""
    d = main.MODEL_DEFAULTS["RNN"]
    cfg = dict(rnn_type="RNN", emsize=128, nlayers=1, init=InitOptions("fbchain"), nonlinearity=d["nonlinearity"],
               **{k: d[k] for k in ("dropout", "dropouth", "dropouti", "dropoute", "wdrop")})
    cfg.update(changes)
    return ModelConfig(**cfg)


@pytest.fixture(scope="module")
def char_corpus(tmp_path_factory):
    # about 50 batches of 32 x 70 characters in one epoch
    return write_char_corpus(tmp_path_factory.mktemp("char"), chars=(50 * 70 * 32 + 1000, 2000, 300))


def exploded_in_first_epoch(tmp_path, data, model, seed=1):
    d = main.MODEL_DEFAULTS["RNN"]
    tc = TrainConfig(data=data, batch_size=32, optimizer=d["optimizer"], lr=d["lr"], epochs=1, seed=seed,
                     save=str(tmp_path / f"{model.nonlinearity}-{model.init.params}" / "model.pt"),
                     progress=False, test_batch_size=10)
    result = run(model, tc)
    (record,) = [json.loads(line) for line in result.paths.metrics.read_text().splitlines()]
    assert 45 <= record["batches"] <= 60
    return record["exploded_batches"]


SPIKE_SEEDS = (1, 2, 3)


def test_elu_fbchain_spikes_in_the_first_steps_and_the_remedies_do_not(tmp_path, char_corpus, caplog):
    """The first-run model with elu (its activation before) spikes above 2 ln V within its first
    ~50 Adam steps on character text; with fbchain's alpha at 0.5 (--init-alpha 0.5) or with tanh
    (the default of --model RNN, which the first-run command uses) no batch does. Over seeds 1-3,
    not one lucky seed: elu spiked for 5 of seeds 1-6 (1-4 batches each), the remedies for none."""
    caplog.set_level(logging.WARNING)
    elu = [exploded_in_first_epoch(tmp_path / f"elu{s}", char_corpus, first_run_model(nonlinearity="elu"), seed=s)
           for s in SPIKE_SEEDS]
    assert sum(n > 0 for n in elu) >= 2, elu
    assert "above 2 ln V" in caplog.text and "training is exploding" in caplog.text
    half_alpha = first_run_model(nonlinearity="elu", init=InitOptions("fbchain", {"alpha": 0.5}))
    for s in SPIKE_SEEDS:
        assert exploded_in_first_epoch(tmp_path / f"half{s}", char_corpus, half_alpha, seed=s) == 0
        assert exploded_in_first_epoch(tmp_path / f"tanh{s}", char_corpus, first_run_model(), seed=s) == 0


def test_explosion_threshold_and_warning(tmp_path, caplog):
    """2 ln V, and a model whose recurrence grows (identity 1.3 with elu: h_t ~ 1.3^t, large but
    finite over these few batches) is reported once per epoch and counted in the metrics."""
    assert explosion_threshold(31) == pytest.approx(2 * math.log(31))
    data = write_bigram_corpus(tmp_path / "c", tokens=(400, 400, 200), vocab=10)
    mc = ModelConfig(rnn_type="RNN", emsize=8, nhid=8, nlayers=1, dropout=0, dropouth=0, dropouti=0,
                     dropoute=0, wdrop=0, nonlinearity="elu", init=InitOptions("identity:scale=1.3", zero_bias=True))
    tc = TrainConfig(data=data, batch_size=4, bptt=20, lr=1e-9, optimizer="adam", epochs=1, clip=0,
                     save=str(tmp_path / "r" / "model.pt"), progress=False)
    caplog.set_level(logging.WARNING)
    result = run(mc, tc)
    (record,) = [json.loads(line) for line in result.paths.metrics.read_text().splitlines()]
    warnings = [r.getMessage() for r in caplog.records if "training is exploding" in r.getMessage()]
    assert len(warnings) == 1 and "is above 2 ln V = 4.80" in warnings[0]
    assert record["exploded_batches"] > 1
    assert f"{record['exploded_batches']} of {record['batches']} training batches" in caplog.text


def test_summary_prints_tokens_per_second_and_tied_nhid_warning(tmp_path, monkeypatch, capsys, caplog):
    data = write_bigram_corpus(tmp_path / "c", tokens=(3_000, 400, 200), vocab=10)
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO)
    argv = ["--data", data, "--model", "RNN", "--nlayers", "1", "--emsize", "8", "--nhid", "32",
            "--epochs", "1", "--batch_size", "4", "--bptt", "20", "--no-progress"]
    assert main.main(argv) == 0
    out = capsys.readouterr().out
    (record,) = metrics_of(tmp_path)
    line = [l for l in out.splitlines() if l.startswith("training speed:")]
    assert line == [f"training speed: {record['tokens_per_s']:,.0f} tokens/s"]
    assert "--nhid 32 is not used" in caplog.text and "--emsize 8 units" in caplog.text
    assert "tok/s" in caplog.text  # the end-of-epoch line
    caplog.clear()
    assert main.main(argv[:6] + ["--no-tied"] + argv[6:] + ["--save", "untied/model.pt"]) == 0
    assert "is not used" not in caplog.text
