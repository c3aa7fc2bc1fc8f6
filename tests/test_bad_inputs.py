"""Bad input on every command line: a non-zero exit and one line saying what is wrong, never a
traceback. The commands run in this process (their ``main(argv)``), as a user would call them."""

import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL_TASK = ["--epochs", "1", "--n-train", "16", "--n-val", "16", "--T", "30", "--no-progress"]


def _lm_speed():
    spec = importlib.util.spec_from_file_location("lm_speed", ROOT / "bench" / "lm_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CASES = [
    # (name, command, argv (with {tmp}), exit code (None: any non-zero), text in the error line)
    ("seed negative", "main", ["--seed", "-5"], 2,
     "--seed must be an integer in [0, 2**32), got -5"),
    ("seed too large", "main", ["--seed", str(2 ** 32)], 2, "--seed must be an integer in [0, 2**32)"),
    ("resume a text file", "main", ["--resume", str(ROOT / "README.md")], 1,
     "README.md: not a checkpoint"),
    ("analyze a JSON file", "analyze", ["{tmp}/metrics.json", "--out", "{tmp}/a"], None,
     "metrics.json: not a checkpoint"),
    ("plug-in raises", "awd_nonnormal.tasks.__main__",
     ["--init-plugin", "{tmp}/raises.py", "--out", "{tmp}/r1", *SMALL_TASK], 2,
     "--init-plugin {tmp}/raises.py: RuntimeError: plug-in exploded"),
    ("plug-in syntax error", "awd_nonnormal.tasks.__main__",
     ["--init-plugin", "{tmp}/broken.py", "--out", "{tmp}/r2", *SMALL_TASK], 2, "SyntaxError"),
    ("sweep plug-in syntax error", "awd_nonnormal.tasks.__main__",
     ["sweep", "--init-plugin", "{tmp}/broken.py", "--out", "{tmp}/s"], 2, "SyntaxError"),
    ("bench unknown model", "lm_speed", ["--models", "RNN"], 2,
     "'RNN'; valid: LSTM, GRU, RNN-tanh, RNN-relu, RNN-elu"),
]


@pytest.mark.parametrize("name,command,argv,code,text", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(tmp_path, capsys, name, command, argv, code, text):
    (tmp_path / "raises.py").write_text('raise RuntimeError("plug-in exploded")\n')
    (tmp_path / "broken.py").write_text("def f(:\n")
    (tmp_path / "metrics.json").write_text('{"epoch": 1, "val_loss": 4.2}\n')
    argv = [a.format(tmp=tmp_path) for a in argv]
    module = _lm_speed() if command == "lm_speed" else importlib.import_module(command)
    try:
        rc = module.main(argv)
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert rc != 0 if code is None else rc == code, err
    assert "Traceback" not in err and "weights_only" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err
    assert text.format(tmp=tmp_path) in errors[0]
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
