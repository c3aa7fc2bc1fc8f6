"""The one checkpoint format: atomic writes, safe loading, clear errors, RNG round trip."""

import os
import pickle
import random

import numpy as np
import pytest
import torch

from awd_nonnormal import checkpoint as C
from awd_nonnormal.runs import write_text


def write(path, **extra):
    return C.save_checkpoint(path, kind="task", arch={"rnn_type": "RNN", "nonlinearity": "elu"},
                             config={"lr": 1e-3}, model={"w": torch.arange(4.0)}, **extra)


def test_round_trip_with_weights_only(tmp_path):
    path = write(tmp_path / "run" / "ckpt.pt", epoch=3, best_val=0.5, metrics=[{"epoch": 1, "loss": 1.0}])
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == C.FORMAT and raw["version"] == C.SCHEMA_VERSION
    ckpt = C.load_checkpoint(path, kind="task")
    assert torch.equal(ckpt["model"]["w"], torch.arange(4.0))
    assert ckpt["epoch"] == 3 and ckpt["metrics"][0]["loss"] == 1.0
    assert os.listdir(tmp_path / "run") == ["ckpt.pt"]  # no temporary file left behind


def test_a_save_syncs_the_file_and_then_its_folder(tmp_path, monkeypatch):
    """atomic_write fsyncs the temporary file before the rename and the folder after it, so the
    new entry survives a power cut too."""
    import stat

    synced = []
    real = os.fsync

    def record(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    C.save_checkpoint(tmp_path / "run" / "a.pt", kind="task", arch={}, config={}, model={})
    assert synced == [False, True]


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = write(tmp_path / "ckpt.pt", epoch=1)
    before = path.read_bytes()

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        write(path, epoch=2)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]


def test_foreign_and_broken_files_are_clear_errors(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(C.CheckpointError, match="not"):
        C.load_checkpoint(foreign)
    assert not marker.exists()  # nothing was executed

    full = write(tmp_path / "good.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(full[: len(full) // 2])
    with pytest.raises(C.CheckpointError, match="truncated or corrupted"):
        C.load_checkpoint(truncated)

    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    with pytest.raises(C.CheckpointError, match="format marker"):
        C.load_checkpoint(other)
    with pytest.raises(C.CheckpointError, match="no such file"):
        C.load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(C.CheckpointError, match="directory"):
        C.load_checkpoint(tmp_path)
    with pytest.raises(C.CheckpointError, match="expected 'lm'"):
        C.load_checkpoint(tmp_path / "good.pt", kind="lm")
    with pytest.raises(ValueError, match="unknown checkpoint kind"):
        C.save_checkpoint(tmp_path / "x.pt", kind="nope", arch={}, config={}, model={})


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    path = write(tmp_path / "c.pt", rng=C.rng_state())
    first = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(2))
    C.set_rng_state(C.load_checkpoint(path)["rng"])
    second = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(2))
    assert torch.equal(first[0], second[0]) and first[1:3] == second[1:3]
    assert np.array_equal(first[3], second[3])


class Foreign:
    """A class of 'other code', which a safe load must refuse."""


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_files_get_the_mode_of_an_ordinary_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        ckpt = write(tmp_path / "ckpt.pt")
        other = C.atomic_write(tmp_path / "summary.json", lambda tmp: open(tmp, "w").write("{}"))
        (tmp_path / "plain.txt").write_text("x")
        text = write_text(tmp_path / "rows.csv", "a,b\r\n1,2\r\n")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == expected
    assert ckpt.stat().st_mode & 0o777 == expected and other.stat().st_mode & 0o777 == expected
    assert text.stat().st_mode & 0o777 == expected and text.read_bytes() == b"a,b\r\n1,2\r\n"
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "plain.txt", "rows.csv", "summary.json"]


def test_files_that_are_no_checkpoint_say_so_without_torch_advice(tmp_path):
    cases = {"README.md": b"# A project\n\nSome text.\n", "metrics.json": b'{"epoch": 1}\n',
             "empty.pt": b"", "binary.bin": bytes(range(7, 200))}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(C.CheckpointError) as info:
            C.load_checkpoint(tmp_path / name)
        msg = str(info.value)
        assert msg == f"{tmp_path / name}: not a checkpoint (not a file written by torch.save)"

    foreign = tmp_path / "foreign.pt"
    torch.save({"model": Foreign()}, foreign)
    with pytest.raises(C.CheckpointError) as info:
        C.load_checkpoint(foreign)
    msg = str(info.value)
    assert "a safe load refuses" in msg and "Foreign" in msg
    assert "weights_only" not in msg and "\n" not in msg
