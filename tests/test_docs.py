"""The README is the user's manual: its two set-up commands are what CI and users run, and every
flag of every command is documented in it."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def setup_commands():
    section = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [b.strip() for b in blocks[:2]], blocks


def test_exactly_two_setup_commands_and_ci_runs_the_test_one():
    (main_cmd, test_cmd), blocks = setup_commands()
    assert len(blocks) == 2, "the Set-up section must hold exactly two commands"
    assert "\n" not in main_cmd and "\n" not in test_cmd
    assert "python main.py" in main_cmd and "pytest" in test_cmd
    for cmd in (main_cmd, test_cmd):
        assert cmd.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install")
        assert '"torch==2.13.0"' in cmd  # the pinned build; pyproject asks only torch>=2.4
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines(), ".ci/run must run the README's test command verbatim"


def test_main_setup_command_parses():
    """The flags of the README's main job are valid main.py flags."""
    main_cmd = setup_commands()[0][0]
    argv = shlex.split(main_cmd.split("python main.py", 1)[1])
    sys.path.insert(0, str(ROOT))
    try:
        import main
    finally:
        sys.path.pop(0)
    args = main.build_parser().parse_args(argv)
    assert args.model == "RNN" and args.init == "fbchain" and args.data == "data/toy"


COMMANDS = [
    [sys.executable, "main.py"],
    [sys.executable, "analyze.py"],
    [sys.executable, "-m", "awd_nonnormal.tasks", "train"],
    [sys.executable, "-m", "awd_nonnormal.tasks", "sweep"],
    [sys.executable, "-m", "awd_nonnormal.experiments", "memory"],
    [sys.executable, "-m", "awd_nonnormal.experiments", "decoding"],
    [sys.executable, "bench/rnn_speed.py"],
    [sys.executable, "bench/lm_speed.py"],
    ["bash", "getdata.sh"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(Path(x).name for x in c[1:]))
def test_every_flag_is_documented(command):
    out = subprocess.run(command + ["--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", out.stdout))
    flags -= {"--help"}
    assert flags, out.stdout
    missing = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![a-z0-9_-])", README))
    assert not missing, f"{' '.join(command[1:])}: flags not in README.md: {missing}"
