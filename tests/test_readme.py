"""The README's ```bash blocks run as written: every `graphopt ...` line parses, and the quick
start's optimize and the code generation examples run (in a scratch folder with the models)."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from graphopt.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_blocks() -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", README, re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """The `graphopt` commands of a block: continuation lines joined, `&&` chains split."""
    found = []
    for line in block.replace("\\\n", " ").splitlines():
        for part in re.split(r"&&|;|\|\|", line.split(" #")[0]):
            argv = shlex.split(part)
            if argv and argv[0] == "graphopt":
                found.append(argv)
    return found


def quick_start() -> list[list[str]]:
    return commands(bash_blocks()[0])


def codegen_examples() -> list[list[str]]:
    section = README.split("## Code generation", 1)[1].split("\n## ", 1)[0]
    return [argv for block in re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M) for argv in commands(block)]


def test_the_readme_has_the_examples_this_file_runs():
    assert [argv[:2] for argv in quick_start()] == [["graphopt", "optimize"]]
    assert any(argv[1] == "compile" and "--target" in argv for argv in codegen_examples())


@pytest.mark.parametrize("argv", [argv for block in bash_blocks() for argv in commands(block)], ids=shlex.join)
def test_every_graphopt_line_parses(argv):
    args = build_parser().parse_args(argv[1:])
    assert args.command == argv[1]


def run_in_scratch(tmp_path: Path, argv: list[str]) -> subprocess.CompletedProcess:
    if not (tmp_path / "models").exists():
        (tmp_path / "models").symlink_to(ROOT / "models")
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *argv[1:]], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)


def test_the_quick_start_runs(tmp_path):
    (argv,) = quick_start()
    r = run_in_scratch(tmp_path, argv)
    assert r.returncode == 0, r.stderr
    out = tmp_path / argv[argv.index("-o") + 1]
    assert (out / "model.opt.onnx").is_file() and json.loads((out / "report.json").read_text())["passes"]


def test_the_code_generation_examples_run(tmp_path):
    for argv in codegen_examples():
        r = run_in_scratch(tmp_path, argv)
        assert r.returncode == 0, (shlex.join(argv), r.stderr)
        out = tmp_path / argv[argv.index("-o") + 1]
        target = argv[argv.index("--target") + 1]
        assert (out / f"model.{target}.so").is_file() and (out / "manifest.json").is_file()
