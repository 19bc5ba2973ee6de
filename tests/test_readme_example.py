"""The README's Wallet and its test, copied out of the README into a project of their own and
run with pytest the way a user runs them (keyq's pytest plugin, no servers)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def readme_block(first_line: str) -> str:
    """The README's python code block that starts with the given line."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"the README has no single block starting {first_line!r}"
    return found[0]


def test_the_readmes_wallet_test_passes_as_a_user_runs_it(tmp_path: Path) -> None:
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "entities.py").write_text(readme_block("# myapp/entities.py"))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_wallet.py").write_text(readme_block("# tests/test_wallet.py"))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_wallet.py"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout
