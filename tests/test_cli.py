"""Both training command lines answer the same bad input with the same exit code
(awd_nonnormal.cli.EXIT_CODES) and one line on stderr, without a traceback."""

from pathlib import Path

import pytest
import torch

import main as lm_main
from awd_nonnormal import cli
from awd_nonnormal.runs import write_json
from awd_nonnormal.tasks import __main__ as tasks_main
from awd_nonnormal.tasks import make_config

CORPUS = Path(__file__).parent / "fixtures" / "legacy_v1" / "corpus"
TASK = ["--task", "copy", "--T", "25", "--hidden", "4", "--n-train", "8", "--n-val", "4",
        "--epochs", "1", "--no-progress"]
TASK_CONFIG = dict(task="copy", T=25, hidden=4, n_train=8, n_val=4, epochs=1)


def _junk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a checkpoint")
    return path


def _lm(tmp, *extra):
    return ["--data", str(CORPUS), "--emsize", "4", "--nhid", "4", "--nlayers", "1",
            "--save", str(tmp / "lm" / "model.pt"), "--no-progress", *extra]


def _task(tmp, *extra):
    return ["train", *TASK, "--out", str(tmp / "task"), *extra]


def _task_folder_with_junk_checkpoint(tmp):
    write_json(tmp / "task" / "config.json", {"config": make_config(**TASK_CONFIG).to_dict()})
    _junk(tmp / "task" / "checkpoint.pt")


def _lm_files_exist(tmp):
    _junk(tmp / "lm" / "model.pt")


def _task_folder_of_another_run(tmp):
    write_json(tmp / "task" / "config.json", {"config": make_config(**{**TASK_CONFIG, "seed": 7}).to_dict()})


# case -> (LM argv extra, task argv extra, set-up, expected exit code, words in the message)
CASES = {
    "bad --device": (["--device", "tpu"], ["--device", "tpu"], None, cli.EXIT_USAGE, "tpu"),
    "unknown init name": (["--init", "nosuch"], ["--init", "nosuch"], None, cli.EXIT_USAGE,
                          "unknown initializer 'nosuch'"),
    "bad init parameter": (["--init", "chain:alpha=x"], ["--init", "chain:alpha=x"], None,
                           cli.EXIT_USAGE, "not a number"),
    "bad seed": (["--seed", "x"], ["--seed", "x"], None, cli.EXIT_USAGE, "--seed"),
    "missing init plug-in": (["--init-plugin", "no_such_module_xyz"], ["--init-plugin", "no_such_module_xyz"],
                             None, cli.EXIT_USAGE, "no_such_module_xyz"),
    "checkpoint that is not a checkpoint": (["--resume", "{tmp}/junk.pt"], [], "junk", cli.EXIT_ERROR,
                                            "not a checkpoint"),
    "output holds another run": ([], [], "exists", cli.EXIT_RUN_EXISTS, "--resume"),
}


def _exit(fn, argv):
    try:
        return fn(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


@pytest.mark.parametrize("case", sorted(CASES))
def test_both_clis_agree_on_bad_input(case, tmp_path, capsys):
    lm_extra, task_extra, setup, code, words = CASES[case]
    lm_extra = [a.replace("{tmp}", str(tmp_path)) for a in lm_extra]
    if setup == "junk":
        _junk(tmp_path / "junk.pt")
        _task_folder_with_junk_checkpoint(tmp_path)
    elif setup == "exists":
        _lm_files_exist(tmp_path)
        _task_folder_of_another_run(tmp_path)
    for name, fn, argv in (("main.py", lm_main.main, _lm(tmp_path, *lm_extra)),
                           ("tasks", tasks_main.main, _task(tmp_path, *task_extra))):
        rc = _exit(fn, argv)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert rc == code, (name, captured.err)
        assert len(lines) == 1 and "error:" in lines[0] and words in lines[0], (name, captured.err)
        assert "Traceback" not in captured.err


def test_nothing_to_resume_is_a_data_error_in_both(tmp_path, capsys):
    (tmp_path / "task").mkdir()
    for fn, argv in ((lm_main.main, _lm(tmp_path, "--resume", str(tmp_path / "none.latest.pt"))),
                     (tasks_main.main, ["train", "--resume", "--out", str(tmp_path / "task"), "--no-progress"])):
        assert _exit(fn, argv) == cli.EXIT_ERROR
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error:" in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_usage_error_in_both(device, tmp_path, capsys):
    for fn, argv in ((lm_main.main, _lm(tmp_path, "--device", device)),
                     (tasks_main.main, _task(tmp_path, "--device", device))):
        assert _exit(fn, argv) == cli.EXIT_USAGE
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no CUDA device" in err[0]


def test_exit_code_table():
    from awd_nonnormal.checkpoint import CheckpointError
    from awd_nonnormal.data import DataError
    from awd_nonnormal.init import InitSpecError
    from awd_nonnormal.runs import Diverged, ResumeConflict, RunExistsError
    assert cli.exit_code(CheckpointError("x")) == cli.EXIT_ERROR == 1
    assert cli.exit_code(DataError("x")) == cli.EXIT_ERROR
    assert cli.exit_code(InitSpecError("x")) == cli.EXIT_USAGE == 2
    assert cli.exit_code(ResumeConflict("x")) == cli.EXIT_USAGE
    assert cli.exit_code(RunExistsError("x")) == cli.EXIT_RUN_EXISTS == 3
    assert cli.exit_code(Diverged("x")) == cli.EXIT_DIVERGED == 4
    assert cli.exit_code(KeyboardInterrupt()) == cli.EXIT_INTERRUPTED == 130
    assert cli.exit_code(ZeroDivisionError()) is None  # a bug is not hidden behind a message
    from awd_nonnormal.lm import LMError
    assert cli.exit_code(LMError("x")) == cli.EXIT_ERROR
    # torch's and internal RuntimeErrors (out of memory, shape bugs) keep their traceback
    assert cli.exit_code(RuntimeError("CUDA out of memory")) is None
    assert cli.exit_code(torch.OutOfMemoryError("x")) is None
    assert sorted(cli.EXIT_CODES.values()) == [0, 1, 2, 3, 4, 130]


def test_run_command_prints_one_line(capsys):
    def fail():
        raise RunExistsError("a\n  b")
    from awd_nonnormal.runs import RunExistsError
    assert cli.run_command("prog", fail) == cli.EXIT_RUN_EXISTS
    assert capsys.readouterr().err == "prog: error: a b\n"
    with pytest.raises(ZeroDivisionError):
        cli.run_command("prog", lambda: 1 / 0)
    # -v: the traceback of a known error too, then the same line
    assert cli.run_command("prog", fail, traceback=True) == cli.EXIT_RUN_EXISTS
    err = capsys.readouterr().err
    assert "Traceback" in err and "RunExistsError" in err and err.endswith("prog: error: a b\n")


def test_given_dests_tells_given_defaults_apart():
    def make():
        p = cli.Parser(prog="p")
        p.add_argument("--n", type=int, default=3)
        p.add_argument("--tag", action="append")
        cli.add_output_arguments(p)
        return p
    assert cli.given_dests(make, []) == frozenset()
    assert cli.given_dests(make, ["--n", "3", "-vv", "--tag", "a"]) == {"n", "verbose", "tag"}
    assert cli.given_dests(make, ["--no-progress"]) == {"no_progress"}
