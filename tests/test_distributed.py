"""DistributedDataParallel language models (awd_nonnormal.distributed): two gloo ranks on the CPU
against one process. Ranks are main.py subprocesses with torchrun's variables set by hand (or
torchrun itself for the failure test)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from awd_nonnormal import distributed as D
from awd_nonnormal.checkpoint import load_checkpoint, load_initial
from awd_nonnormal.lm import run
from test_lm import configs, metrics, write_corpus

ROOT = Path(__file__).resolve().parents[1]

# a tiny LSTM without any dropout: the only randomness is the initial weights (seeded) and the
# BPTT lengths (a generator of its own), so K ranks must reproduce one process
MODEL = dict(rnn_type="LSTM", emsize=8, nhid=12, nlayers=2, dropout=0, dropouth=0, dropouti=0,
             dropoute=0, wdrop=0, init="plain")
TRAIN = dict(batch_size=5, eval_batch_size=3, test_batch_size=1, bptt=8, lr=2.0, clip=0.25, seed=7)
FLAGS = ["--model", "LSTM", "--emsize", "8", "--nhid", "12", "--nlayers", "2", "--dropout", "0",
         "--dropouth", "0", "--dropouti", "0", "--dropoute", "0", "--wdrop", "0", "--init", "plain",
         "--batch_size", "5", "--eval-batch-size", "3", "--test-batch-size", "1", "--bptt", "8",
         "--lr", "2.0", "--clip", "0.25", "--seed", "7", "--no-progress", "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in D.ENV_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def launch(args, world=2, timeout=120):
    """Run main.py as ``world`` ranks of one gloo job; returns [(returncode, stderr)] by rank."""
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(world)]
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, err))
    return out


def _close(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=rtol, atol=atol), k


def _same_run(dist_dir: Path, single_result, epochs: int):
    """The K-rank run's files equal the one-process run's, to float tolerance."""
    mine = load_checkpoint(dist_dir / "model.latest.pt", kind="lm")
    ref = load_checkpoint(single_result.paths.latest, kind="lm")
    assert mine["epoch"] == ref["epoch"] == epochs
    _close(mine["model"], ref["model"])
    rows = [json.loads(l) for l in (dist_dir / "model.metrics.jsonl").read_text().splitlines()]
    ref_rows = metrics(single_result)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref_rows]
    assert [r["batches"] for r in rows] == [r["batches"] for r in ref_rows]  # same BPTT lengths
    for r, q in zip(rows, ref_rows):
        assert r["train_loss"] == pytest.approx(q["train_loss"], rel=1e-5)
        assert r["val_loss"] == pytest.approx(q["val_loss"], rel=1e-5)
    best, ref_best = (load_checkpoint(p, kind="lm") for p in (dist_dir / "model.pt", single_result.paths.best))
    assert best["test"]["loss"] == pytest.approx(ref_best["test"]["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-process runs: one epoch, and two epochs straight."""
    tmp = tmp_path_factory.mktemp("ddp")
    corpus = write_corpus(tmp / "corpus", sizes=(700, 200, 150))
    torch.set_num_threads(1)
    one = run(*configs(tmp, corpus, name="one", model=MODEL, epochs=1, **TRAIN))
    two = run(*configs(tmp, corpus, name="two", model=MODEL, epochs=2, **TRAIN))
    return tmp, corpus, one, two


def test_columns_share_the_batch_contiguously():
    for batch in (1, 4, 5, 7, 80):
        for world in (1, 2, 3, 8):
            slices = [D.Dist(r, world).columns(batch) for r in range(world)]
            assert slices[0][0] == 0 and slices[-1][1] == batch
            assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))  # contiguous, in order
            sizes = [hi - lo for lo, hi in slices]
            assert max(sizes) - min(sizes) <= 1


def test_from_env_reads_torchrun_variables():
    assert D.from_env({}) is D.SINGLE
    assert D.from_env({"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}) == D.Dist(1, 3, 0)
    with pytest.raises(ValueError, match="inconsistent"):
        D.from_env({"RANK": "3", "WORLD_SIZE": "3"})
    with pytest.raises(ValueError, match="integers"):
        D.from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_hidden_slices_and_joins_back():
    h = [(torch.randn(1, 5, 3), torch.randn(1, 5, 3)), (torch.randn(1, 5, 2), torch.randn(1, 5, 2))]
    parts = [D.slice_hidden(h, 0, 3), D.slice_hidden(h, 3, 5)]
    assert parts[1][0][0].shape == (1, 2, 3)
    joined = D.cat_hidden(parts)
    assert all(torch.equal(a, b) for x, y in zip(joined, h) for a, b in zip(x, y))


def test_two_ranks_equal_one_process_and_resume_in_one(reference):
    tmp, corpus, one, two = reference
    out = tmp / "ddp"
    ranks = launch(["--data", corpus, *FLAGS, "--epochs", "1", "--save", str(out / "model.pt")])
    assert [rc for rc, _ in ranks] == [0, 0], ranks
    _same_run(out, one, epochs=1)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    # the 2-rank checkpoint goes on in one process
    mc, tc = configs(tmp, corpus, name="ddp", model=MODEL, epochs=2, **TRAIN)
    run(mc, tc, resume=str(out / "model.latest.pt"), explicit=frozenset({"epochs"}))
    _same_run(out, two, epochs=2)


def test_one_process_checkpoint_resumes_on_two_ranks(reference):
    tmp, corpus, one, two = reference
    out = tmp / "single-then-ddp"
    mc, tc = configs(tmp, corpus, name="single-then-ddp", model=MODEL, epochs=1, **TRAIN)
    run(mc, tc)
    ranks = launch(["--resume", str(out / "model.latest.pt"), "--epochs", "2", "--no-progress"])
    assert [rc for rc, _ in ranks] == [0, 0], ranks
    _same_run(out, two, epochs=2)


def test_torchrun_without_save_is_a_usage_error(tmp_path):
    env = _env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    p = subprocess.run([sys.executable, str(ROOT / "main.py"), "--data", str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "--save" in p.stderr and "Traceback" not in p.stderr


def _children(pid):
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the ranks")
def test_a_killed_rank_stops_the_job_and_leaves_whole_checkpoints(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", sizes=(3000, 200, 150))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "main.py"), "--data", corpus, *FLAGS, "--epochs", "1000",
           "--save", str(out / "model.pt")]
    job = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while not (out / "model.latest.pt").exists():  # one epoch done: the ranks are training
            assert job.poll() is None and time.time() < deadline, job.stdout.read()
            time.sleep(0.2)
        ranks = sorted(_children(job.pid))
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGKILL)
        output, _ = job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert "SIGKILL" in output or "Signal 9" in output or "exitcode: -9" in output, output
    for path in out.glob("*.pt"):  # every checkpoint there is whole
        if not path.name.endswith(".initial.pt"):
            load_initial(load_checkpoint(path, kind="lm"), path)  # with the initial weights it names
    assert (out / "model.latest.pt").exists()
