"""Finetuning: averaged SGD from the first batch into a new run beside the source, which lowers
the validation loss of a half-trained model and leaves every file of the source run untouched;
existing targets, the source's own files and model changes are refused."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from awd_nonnormal import lm
from awd_nonnormal.checkpoint import load_checkpoint, load_initial
from awd_nonnormal.finetune import FinetuneError, default_target, finetune
from awd_nonnormal.runs import OutputError, RunExistsError, RunLocked
from awd_nonnormal.model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def learnable_corpus(folder):
    folder.mkdir(parents=True)
    for split, n in (("train", 300), ("valid", 20), ("test", 20)):
        (folder / f"{split}.txt").write_text("".join(f"the cat sat on the mat {i % 4}\n" for i in range(n)))
    return str(folder)


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    data = learnable_corpus(tmp / "corpus")
    mcfg = ModelConfig(rnn_type="LSTM", emsize=8, nhid=16, nlayers=2, dropout=0.1, dropouth=0.1,
                       dropouti=0.1, dropoute=0.0, wdrop=0.1)
    tcfg = lm.TrainConfig(data=data, batch_size=8, eval_batch_size=2, bptt=10, lr=30.0, epochs=2,
                          alpha=0.0, beta=0.0, save=str(tmp / "run" / "model.pt"), progress=False,
                          device="cpu", seed=4)
    result = lm.run(mcfg, tcfg)
    return result


def test_finetune_lowers_validation_loss_and_leaves_the_source_untouched(source):
    folder = source.paths.best.parent
    before = digests(folder)
    explicit = frozenset({"epochs", "lr", "progress"})
    result = finetune(str(source.paths.best), ModelConfig(),
                      lm.TrainConfig(epochs=2, lr=30.0, progress=False), explicit=explicit)
    assert result.paths.best == Path(default_target(str(source.paths.best)))
    assert result.paths.best.name == "model.finetune.pt"
    assert result.val_loss < source.val_loss - 0.1  # measured: 1.55 -> 0.91 nats
    after = digests(folder)
    assert {k: after[k] for k in before} == before  # every source file byte-identical
    ckpt = load_checkpoint(result.paths.best, kind="lm")
    assert ckpt["finetuned_from"]["path"] == str(source.paths.best)
    src_initial = load_initial(load_checkpoint(source.paths.best, kind="lm"), source.paths.best)
    ft_initial = load_initial(ckpt, result.paths.best)
    assert src_initial and src_initial.keys() == ft_initial.keys()
    assert all(torch.equal(src_initial[k], ft_initial[k]) for k in src_initial)
    metrics = [json.loads(line) for line in result.paths.metrics.read_text().splitlines()]
    assert [m["optimizer"] for m in metrics] == ["asgd"] * 2
    latest = load_checkpoint(result.paths.latest, kind="lm")
    assert latest["optimizer_name"] == "asgd" and "ax" in next(iter(latest["optimizer"]["state"].values()))


def test_existing_target_source_files_and_model_changes_are_refused(source, tmp_path):
    src = str(source.paths.best)
    target = str(tmp_path / "t" / "model.pt")
    cfg = lm.TrainConfig(epochs=1, progress=False, save=target)
    finetune(src, ModelConfig(), cfg, explicit=frozenset({"epochs", "progress", "save"}))
    with pytest.raises(RunExistsError, match="--overwrite"):
        finetune(src, ModelConfig(), cfg, explicit=frozenset({"epochs", "progress", "save"}))
    for own in (src, str(source.paths.latest)):
        with pytest.raises(RunExistsError, match="source run"):
            finetune(src, ModelConfig(), lm.TrainConfig(save=own, overwrite=True),
                     explicit=frozenset({"save", "overwrite"}))
    with pytest.raises(FinetuneError, match="nhid 32"):
        finetune(src, ModelConfig(nhid=32), cfg, explicit=frozenset({"nhid", "save"}))


def test_finetune_command(source, tmp_path):
    before = digests(source.paths.best.parent)
    target = tmp_path / "cli" / "model.pt"
    cmd = [sys.executable, "finetune.py", str(source.paths.best), "--epochs", "1", "--save", str(target),
           "--no-progress", "--device", "cpu"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert target.exists() and "valid" in out.stdout
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 3 and "already exist" in again.stderr and "Traceback" not in again.stderr
    both = subprocess.run([sys.executable, "main.py", "--finetune", str(source.paths.best), "--resume",
                           str(source.paths.latest)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert both.returncode == 2 and "one of them" in both.stderr
    assert digests(source.paths.best.parent) == before


HOLDER = """
import sys, time
from awd_nonnormal.runs import RunLock
with RunLock(sys.argv[1], "test"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_finetune_keeps_the_run_folder_rules(source, tmp_path, monkeypatch):
    """The rules of main.py's runs hold for a finetune's target (once it had none): --save's folder
    is checked before any training, another process writing the target refuses the finetune, and
    --overwrite leaves no file of the run it replaces (its snapshots included)."""
    src = str(source.paths.best)
    trained = []
    real_fit = lm.Trainer.fit
    monkeypatch.setattr(lm.Trainer, "fit", lambda self: trained.append(1) or real_fit(self))
    (tmp_path / "file").write_text("x")
    cfg = lm.TrainConfig(epochs=1, progress=False, save=str(tmp_path / "file" / "model.pt"))
    with pytest.raises(OutputError, match="--save"):
        finetune(src, ModelConfig(), cfg, explicit=frozenset({"epochs", "progress", "save"}))
    assert trained == []
    # another process holds the target's lock
    target = tmp_path / "t" / "model.pt"
    target.parent.mkdir()
    lock = lm.RunPaths.from_save(str(target)).lock
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = lm.TrainConfig(epochs=1, progress=False, save=str(target))
        with pytest.raises(RunLocked):
            finetune(src, ModelConfig(), cfg, explicit=frozenset({"epochs", "progress", "save"}))
        assert trained == [] and [p.name for p in target.parent.iterdir()] == [lock.name]
    finally:
        holder.kill()
        holder.wait()
    # --overwrite: an old snapshot of the target run does not survive
    finetune(src, ModelConfig(), cfg, explicit=frozenset({"epochs", "progress", "save"}))
    stale = target.with_name("model.e7.pt")
    stale.write_bytes(target.read_bytes())
    again = lm.TrainConfig(epochs=1, progress=False, save=str(target), overwrite=True)
    finetune(src, ModelConfig(), again, explicit=frozenset({"epochs", "progress", "save", "overwrite"}))
    assert not stale.exists() and target.exists()
