"""--threads on main.py, analyze.py, pointer.py and generate.py: the tasks command's default (1),
0 for torch's own, and a negative count is a one-line usage error."""

from __future__ import annotations

import pytest
import torch

import analyze
import generate
import main
import pointer

# Each command with the arguments that make it start and then fail on a missing file.
MISSING = {main: lambda tmp: ["--data", str(tmp / "none")], analyze: lambda tmp: [str(tmp / "none.pt")],
           pointer: lambda tmp: ["--save", str(tmp / "none.pt")],
           generate: lambda tmp: ["--checkpoint", str(tmp / "none.pt")]}


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cli", list(MISSING), ids=lambda m: m.__name__)
def test_negative_threads_is_a_usage_error(cli, capsys, keep_threads, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--threads", "-1"] + MISSING[cli](tmp_path))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--threads must be >= 0, got -1" in err and "Traceback" not in err


@pytest.mark.parametrize("cli", list(MISSING), ids=lambda m: m.__name__)
def test_default_is_one_thread_like_the_tasks_command(cli, tmp_path, keep_threads):
    torch.set_num_threads(2)
    assert cli.build_parser().parse_args(MISSING[cli](tmp_path)).threads == 1
    # a missing file fails after the thread count is set
    try:
        code = cli.main(MISSING[cli](tmp_path))
    except SystemExit as exc:
        code = exc.code
    assert code == 1
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("command", [["train"], ["sweep"]])
def test_tasks_command_uses_the_shared_threads_flag(command, capsys, keep_threads):
    from awd_nonnormal.tasks import __main__ as tasks

    assert tasks.build_parser().parse_args(command).threads == 1
    assert tasks.build_parser().parse_args(command + ["--threads", "0"]).threads == 0
    with pytest.raises(SystemExit) as exc:
        tasks.main(command + ["--threads", "-1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--threads must be >= 0, got -1" in err and "Traceback" not in err
