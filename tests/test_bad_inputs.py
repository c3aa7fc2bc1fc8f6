"""Bad input on every command line: a non-zero exit and one line saying what is wrong, never a
traceback. Each case runs the real command in a subprocess."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = [sys.executable, "-m", "awd_nonnormal.tasks"]
SMALL_TASK = ["--epochs", "1", "--n-train", "16", "--n-val", "16", "--T", "30", "--no-progress"]


def _files(tmp: Path) -> dict:
    (tmp / "raises.py").write_text('raise RuntimeError("plug-in exploded")\n')
    (tmp / "broken.py").write_text("def f(:\n")
    (tmp / "metrics.json").write_text('{"epoch": 1, "val_loss": 4.2}\n')
    return {"tmp": tmp}


CASES = [
    # (name, argv (with {tmp}), exit code, text in the error line)
    ("seed negative", [sys.executable, "main.py", "--seed", "-5"], 2,
     "--seed must be an integer in [0, 2**32), got -5"),
    ("seed too large", [sys.executable, "main.py", "--seed", str(2 ** 32)], 2,
     "--seed must be an integer in [0, 2**32)"),
    ("resume a text file", [sys.executable, "main.py", "--resume", "README.md"], 1,
     "README.md: not a checkpoint"),
    ("analyze a JSON file", [sys.executable, "analyze.py", "{tmp}/metrics.json", "--out", "{tmp}/a"],
     None, "metrics.json: not a checkpoint"),
    ("plug-in raises", TASKS + ["--init-plugin", "{tmp}/raises.py", "--out", "{tmp}/r1", *SMALL_TASK],
     2, "--init-plugin {tmp}/raises.py: RuntimeError: plug-in exploded"),
    ("plug-in syntax error", TASKS + ["--init-plugin", "{tmp}/broken.py", "--out", "{tmp}/r2",
                                      *SMALL_TASK], 2, "SyntaxError"),
    ("sweep plug-in syntax error", TASKS + ["sweep", "--init-plugin", "{tmp}/broken.py", "--out",
                                            "{tmp}/s"], 2, "SyntaxError"),
    ("bench unknown model", [sys.executable, "bench/lm_speed.py", "--models", "RNN"], 2,
     "'RNN'; valid: LSTM, GRU, RNN-tanh, RNN-relu, RNN-elu"),
]


@pytest.mark.parametrize("name,argv,code,text", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(tmp_path, name, argv, code, text):
    fmt = _files(tmp_path)
    argv = [a.format(**fmt) for a in argv]
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 if code is None else r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr and "weights_only" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, r.stderr
    assert text.format(**fmt) in errors[0]
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
