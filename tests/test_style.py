import subprocess
import sys

from conftest import REPO


def test_ruff_lint_and_format_are_clean():
    for command in (["check", "--quiet"], ["format", "--check", "--quiet"]):
        result = subprocess.run([sys.executable, "-m", "ruff", *command, str(REPO)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
