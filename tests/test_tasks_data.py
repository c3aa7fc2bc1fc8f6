"""Synthetic-task data: copy and addition generators, baselines, psMNIST permutation, IDX reader."""

import gzip
import math
import struct

import numpy as np
import pytest
import torch

from awd_nonnormal.tasks import data as D


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# copy


@pytest.mark.parametrize("layout,T,L", [("paper", 500, 500), ("paper", 30, 30),
                                        ("arjovsky", 500, 520), ("arjovsky", 30, 50)])
def test_copy_layout_and_targets(layout, T, L):
    x, y = D.copy_batch(7, T, gen(), layout)
    assert x.shape == y.shape == (L, 7)
    assert x.dtype == y.dtype == torch.long
    sym = x[:10]
    assert ((sym >= 1) & (sym <= 8)).all()
    assert (x[10:L - 11] == 0).all()          # the delay: blanks
    assert (x[L - 11] == 9).all()             # the cue
    assert (x[L - 10:] == 0).all()            # blanks while the output is produced
    assert (y[:L - 10] == 0).all()
    assert torch.equal(y[L - 10:], sym)       # the 10 symbols, in order
    assert int(y.max()) < D.COPY_CLASSES and int(x.max()) < D.COPY_SYMBOLS


def test_copy_paper_layout_counts_match_the_paper():
    # paper: 10 symbols, T - 21 zeros, the cue, 10 zeros
    T = 40
    x, _ = D.copy_batch(1, T, gen(), "paper")
    seq = x[:, 0].tolist()
    assert seq[10:10 + T - 21] == [0] * (T - 21) and seq[10 + T - 21] == 9 and len(seq) == T
    # arjovsky: T - 1 blanks and the cue between the symbols and the outputs (T steps of delay)
    x, _ = D.copy_batch(1, T, gen(), "arjovsky")
    seq = x[:, 0].tolist()
    assert seq[10:10 + T - 1] == [0] * (T - 1) and seq[10 + T - 1] == 9 and len(seq) == T + 20


def test_copy_baselines():
    assert D.copy_baseline(500) == pytest.approx(10 * math.log(8) / 500)
    assert D.copy_baseline(500) == pytest.approx(0.0416, abs=5e-5)
    assert D.copy_baseline(500, "arjovsky") == pytest.approx(10 * math.log(8) / 520)
    assert D.copy_baseline(500, "arjovsky") == pytest.approx(0.0400, abs=5e-5)


def test_copy_baseline_is_the_memoryless_optimum():
    # the loss of "blank for sure, then uniform over 1..8" on real data equals the formula
    x, y = D.copy_batch(64, 30, gen(), "paper")
    logits = torch.full((30, 64, 9), -1e4)
    logits[:20, :, 0] = 0.0
    logits[20:, :, 1:] = 0.0
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 9), y.reshape(-1))
    assert loss.item() == pytest.approx(D.copy_baseline(30), rel=1e-5)


def test_copy_bad_lengths_and_layout():
    with pytest.raises(ValueError, match="T >= 21"):
        D.copy_total_length(20, "paper")
    with pytest.raises(ValueError, match="valid layouts: paper, arjovsky"):
        D.copy_total_length(100, "other")


def test_same_seed_same_data_and_one_hot():
    a = D.copy_batch(5, 30, gen(3))
    b = D.copy_batch(5, 30, gen(3))
    c = D.copy_batch(5, 30, gen(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    s = D.CopySet.generate(8, 30, gen(1))
    x, y = s.batch(torch.tensor([2, 5]), torch.device("cpu"))
    assert x.shape == (30, 2, 10) and torch.equal(x.sum(-1), torch.ones(30, 2))
    assert torch.equal(x.argmax(-1)[:10].t(), s.symbols[[2, 5]].long())
    assert s.symbols.dtype == torch.uint8  # compact storage


# --------------------------------------------------------------------------------------------
# addition


def test_addition_markers_and_target():
    T, B = 51, 400
    x, y = D.addition_batch(B, T, gen())
    assert x.shape == (T, B, 2) and y.shape == (B,)
    markers = x[:, :, 0]
    assert torch.equal(markers.sum(0), torch.full((B,), 2.0))
    first = markers[:T // 2].argmax(0)
    second = markers[T // 2:].argmax(0) + T // 2
    assert torch.equal(markers[:T // 2].sum(0), torch.ones(B))   # one marker in each half
    assert torch.equal(markers[T // 2:].sum(0), torch.ones(B))
    vals = x[:, :, 1]
    assert ((vals >= 0) & (vals < 1)).all()
    b = torch.arange(B)
    assert torch.allclose(y, vals[first, b] + vals[second, b])
    # positions cover the halves
    assert first.min() == 0 and first.max() == T // 2 - 1
    assert second.min() == T // 2 and second.max() == T - 1


def test_addition_baseline_is_the_variance_of_the_sum():
    assert D.addition_baseline() == pytest.approx(1 / 6)
    _, y = D.addition_batch(200_000, 4, gen(1))
    assert ((y - 1) ** 2).mean().item() == pytest.approx(1 / 6, rel=0.02)


def test_addition_same_seed():
    a = D.addition_batch(3, 20, gen(9))
    b = D.addition_batch(3, 20, gen(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------------------------
# psMNIST permutation


def test_default_permutation_is_exprnn_scornn():
    assert D.DEFAULT_PERM_SEED == 92916
    expected = np.random.RandomState(92916).permutation(784)
    assert torch.equal(D.pixel_permutation(D.DEFAULT_PERM_SEED), torch.from_numpy(expected))
    assert torch.equal(D.pixel_permutation(5), D.pixel_permutation(5))
    assert not torch.equal(D.pixel_permutation(5), D.pixel_permutation(6))


def test_permutation_applied_to_every_image():
    perm = D.pixel_permutation(92916)
    images = torch.randint(0, 256, (3, 784), dtype=torch.uint8)
    labels = torch.tensor([1, 2, 3])
    s = D.MnistSet(images, labels, perm)
    x, y = s.batch(torch.arange(3), torch.device("cpu"))
    assert x.shape == (784, 3, 1) and torch.equal(y, labels)
    assert x.min() >= 0 and x.max() <= 1
    # a single bright pixel moves to the step where the permutation puts it
    one = torch.zeros(2, 784, dtype=torch.uint8)
    one[0, 100] = 255
    one[1, 700] = 255
    x, _ = D.MnistSet(one, torch.zeros(2, dtype=torch.long), perm).batch(torch.arange(2), torch.device("cpu"))
    step0 = int((perm == 100).nonzero())
    step1 = int((perm == 700).nonzero())
    assert x[step0, 0, 0] == 1.0 and x[:, 0, 0].sum() == 1.0
    assert x[step1, 1, 0] == 1.0 and x[:, 1, 0].sum() == 1.0
    # and every image: step t holds pixel perm[t]
    x, _ = s.batch(torch.arange(3), torch.device("cpu"))
    assert torch.equal(x[:, :, 0].t(), images[:, perm].float() / 255)


# --------------------------------------------------------------------------------------------
# IDX reader


def idx_bytes(magic, dims, payload):
    return struct.pack(f">i{len(dims)}i", magic, *dims) + bytes(payload)


def write(path, raw, gz):
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(raw)
    else:
        path.write_bytes(raw)
    return path


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    images = np.arange(2 * 28 * 28, dtype=np.uint64).reshape(2, 28, 28) % 256
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    p = write(tmp_path / name, idx_bytes(2051, (2, 28, 28), images.astype(np.uint8).tobytes()), gz)
    t = D.read_idx(p, 2051)
    assert t.dtype == torch.uint8 and t.shape == (2, 28, 28)
    assert np.array_equal(t.numpy(), images.astype(np.uint8))
    labels = write(tmp_path / ("train-labels-idx1-ubyte" + (".gz" if gz else "")),
                   idx_bytes(2049, (2,), [3, 7]), gz)
    assert D.read_idx(labels, 2049).tolist() == [3, 7]
    imgs, labs = D.load_mnist(tmp_path, "train")
    assert imgs.shape == (2, 784) and labs.tolist() == [3, 7] and labs.dtype == torch.long


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("raw,match", [
    (idx_bytes(1234, (2,), [1, 2]), "bad IDX magic number 1234"),
    (idx_bytes(2049, (5,), [1, 2]), "truncated"),
    (idx_bytes(2049, (2,), [1, 2, 3]), "trailing bytes"),
    (b"\x00\x00", "too short"),
    (struct.pack(">i", 2051) + b"\x00\x00", "truncated IDX header"),
])
def test_idx_malformed(tmp_path, gz, raw, match):
    p = write(tmp_path / ("f.gz" if gz else "f"), raw, gz)
    with pytest.raises(D.IDXError, match=match) as info:
        D.read_idx(p)
    assert "./getdata.sh mnist" in str(info.value)


def test_idx_wrong_kind_and_counts(tmp_path):
    p = write(tmp_path / "x", idx_bytes(2049, (2,), [1, 2]), False)
    with pytest.raises(D.IDXError, match="expected 2051"):
        D.read_idx(p, 2051)
    write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(2051, (3, 28, 28), [0] * 3 * 784), False)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(2049, (2,), [0, 1]), False)
    with pytest.raises(D.IDXError, match="3 t10k images but 2 labels"):
        D.load_mnist(tmp_path, "t10k")


def test_missing_mnist_gives_the_hint(tmp_path):
    with pytest.raises(D.IDXError, match=r"no train-images-idx3-ubyte.gz or .*getdata.sh mnist"):
        D.load_mnist(tmp_path, "train")
    with pytest.raises(D.IDXError, match="no such file"):
        D.read_idx(tmp_path / "nope.gz")
