"""The package's shape holds: handler code does not drag the database in, the cluster view is
read without the worker side, and only the mailbox knows kombu's Redis layout."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def loaded_after(statement: str) -> set[str]:
    """Modules a fresh interpreter has loaded after running the statement."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


def test_handler_code_imports_neither_the_repo_nor_sqlalchemy() -> None:
    loaded = loaded_after("import keyq.context, keyq.entity")
    assert "keyq.context" in loaded  # the check ran
    assert not {m for m in loaded if m == "sqlalchemy" or m.startswith("sqlalchemy.")}
    assert "keyq.repo" not in loaded


def test_status_demo_and_reconciler_do_not_import_the_worker_side() -> None:
    loaded = loaded_after("import keyq.status, keyq.demo, keyq.reconciler, keyq.cluster")
    assert "keyq.cluster" in loaded
    assert not loaded & {"keyq.worker", "keyq.ownership", "keyq.celery_worker", "keyq.applier"}


def test_only_the_mailbox_names_kombus_redis_structures() -> None:
    kombu_names = re.compile(r"""["'](unacked|unacked_index|unacked_mutex)["']""")
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "keyq").rglob("*.py")
        if path.name != "mailbox.py" and kombu_names.search(path.read_text())
    ]
    assert offenders == []
    assert kombu_names.search((ROOT / "keyq" / "mailbox.py").read_text())
