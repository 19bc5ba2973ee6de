"""docs/fastapi.md's app, run as written through FastAPI's TestClient against a real worker."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from keyq.client import Client
from keyq.settings import Settings
from tests.conftest import ROOT, WorkerFactory, poll

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]


def _doc_app(tmp_path: Path) -> Any:
    text = (ROOT / "docs" / "fastapi.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S)
    assert code is not None, "docs/fastapi.md has no python block"
    path = tmp_path / "doc_app.py"
    path.write_text(code.group(1))
    spec = importlib.util.spec_from_file_location("doc_app", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["doc_app"] = module
    spec.loader.exec_module(module)
    return module.app


def test_the_fastapi_example_serves_calls_sends_and_reads(
    start_worker: WorkerFactory,
    settings: Settings,
    client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    start_worker()
    app = _doc_app(tmp_path)
    with TestClient(app) as http:
        assert http.post("/counters/c1/add", json={"by": 2}).json() == {"value": 2}
        assert http.post("/counters/c1/add", json={"by": 3}).json() == {"value": 5}
        refused = http.post("/counters/c1/add", json={"by": "x"})
        assert refused.status_code == 409
        assert http.post("/counters/" + "k" * 300 + "/add", json={}).status_code == 422
        headers = {"Idempotency-Key": "order-17"}
        first = http.post("/carts/u1/items", json={"item": "tea"}, headers=headers)
        again = http.post("/carts/u1/items", json={"item": "tea"}, headers=headers)
        assert first.status_code == again.status_code == 202
        assert first.json() == again.json()
        http.post("/carts/u1/items", json={"item": "jam"})
        poll(
            lambda: (http.get("/cart/u1").json()["state"] or {}).get("items", {}).get("jam"),
            what="the cart's later add",
        )
        assert http.get("/cart/u1").json()["state"]["items"] == {"tea": 1, "jam": 1}
        assert http.get("/counter/c1").json() == {"state": {"value": 5}}
    assert client.read("counter", "c1") == {"value": 5}
