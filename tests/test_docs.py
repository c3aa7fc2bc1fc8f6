"""README.md is the front page and docs/ the manual: the README's two set-up commands are what CI
and users run, every flag of every command is documented in README.md or docs/, every relative
link there points to a file that exists, and the front page stays short."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOCS = "\n".join(path.read_text() for path in DOC_FILES)


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
    # ... after installing the optional cluster extra into the same .venv, so the Ray tests run
    lines = ci.splitlines()
    extra = [i for i, l in enumerate(lines) if '-e ".[cluster]"' in l and not l.startswith("#")]
    assert extra and extra[0] < lines.index(test_cmd)
    assert 'cluster = ["ray' in (ROOT / "pyproject.toml").read_text()


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
    [sys.executable, "finetune.py"],
    [sys.executable, "pointer.py"],
    [sys.executable, "generate.py"],
    [sys.executable, "-m", "awd_nonnormal.tasks", "train"],
    [sys.executable, "-m", "awd_nonnormal.tasks", "sweep"],
    [sys.executable, "-m", "awd_nonnormal.lmgrid"],
    [sys.executable, "-m", "awd_nonnormal.experiments", "memory"],
    [sys.executable, "-m", "awd_nonnormal.experiments", "decoding"],
    [sys.executable, "-m", "awd_nonnormal.reproduce"],
    [sys.executable, "bench/rnn_speed.py"],
    [sys.executable, "bench/lm_speed.py"],
    [sys.executable, "bench/nonnormal_claim.py"],
    [sys.executable, "bench/ensemble_speed.py"],
    ["bash", "getdata.sh"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(Path(x).name for x in c[1:]))
def test_every_flag_is_documented(command):
    out = subprocess.run(command + ["--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", out.stdout))
    flags -= {"--help"}
    assert flags, out.stdout
    missing = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![a-z0-9_-])", DOCS))
    assert not missing, f"{' '.join(command[1:])}: flags in neither README.md nor docs/: {missing}"


def test_manual_pages_exist():
    names = {path.name for path in DOC_FILES}
    for page in ("index.md", "initializers.md", "language-models.md", "tasks.md", "analysis.md",
                 "data.md", "checkpoints.md", "design.md", "performance.md"):
        assert page in names, f"docs/{page} is missing"


def relative_links(text):
    """Targets of Markdown links and images that are not web addresses or in-page anchors,
    outside fenced code blocks."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    targets = re.findall(r"\]\(([^)\s]+)\)", prose)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]


def test_relative_links_point_to_existing_files():
    broken = []
    for path in DOC_FILES:
        for target in relative_links(path.read_text()):
            file_part = target.split("#", 1)[0]
            if not (path.parent / file_part).exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, f"links to missing files: {broken}"


def test_link_check_sees_relative_links_and_skips_the_rest():
    text = ("[a](docs/a.md) [b](b.md#part) ![c](figures/c.png) [d](https://x.org/a.md) [e](#here)\n"
            "```\n[f](not/a/link.md)\n```\n")
    assert relative_links(text) == ["docs/a.md", "b.md#part", "figures/c.png"]


def test_readme_is_a_short_front_page():
    size = len(README.encode("utf-8"))
    assert size < 15 * 1024, f"README.md is {size} bytes; the manual belongs in docs/"
