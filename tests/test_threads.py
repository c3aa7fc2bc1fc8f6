"""--threads on main.py and analyze.py: the tasks command's default (1), 0 for torch's own, and a
negative count is a one-line usage error."""

from __future__ import annotations

import pytest
import torch

import analyze
import main


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cli", [main, analyze])
def test_negative_threads_is_a_usage_error(cli, capsys, keep_threads):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--threads", "-1"] + (["x.pt"] if cli is analyze else []))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--threads must be >= 0, got -1" in err and "Traceback" not in err


@pytest.mark.parametrize("cli", [main, analyze])
def test_default_is_one_thread_like_the_tasks_command(cli, tmp_path, keep_threads):
    torch.set_num_threads(2)
    parsed = cli.build_parser().parse_args([] if cli is main else ["x.pt"])
    assert parsed.threads == 1
    # a missing file fails after the thread count is set
    argv = ["--data", str(tmp_path / "none")] if cli is main else [str(tmp_path / "none.pt")]
    try:
        cli.main(argv)
    except SystemExit:
        pass
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
