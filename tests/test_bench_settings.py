"""scripts/bench --setting: keyq's side of a benchmark run under another setting (for instance
KEYQ_FOLLOW_ON=0, to measure what the follow-on batch buys), refused before the run starts when
the variable or its value is wrong. Pure functions: no server is started."""

from __future__ import annotations

import sys

import pytest

from keyq.bench.infra import BenchServers, setting_changes
from keyq.bench.procs import keyq_env
from keyq.errors import ConfigurationError
from keyq.settings import Settings


def test_a_setting_is_read_as_a_worker_reads_it_and_reaches_the_workers_environment() -> None:
    changes = setting_changes(["KEYQ_FOLLOW_ON=0", "KEYQ_BATCH_MAX=64"])
    assert changes == {"follow_on": False, "batch_max": 64}
    servers = BenchServers.new("redis://127.0.0.1:6379/0", "postgresql://postgres@h/postgres")
    worker = Settings.from_env(keyq_env(servers.settings(**changes)))
    assert worker.follow_on is False and worker.batch_max == 64
    assert worker.namespace == servers.namespace  # the run's own namespace, as before
    assert Settings.from_env(keyq_env(servers.settings())).follow_on is True  # the default


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("KEYQ_FOLOW_ON=0", "one of keyq's variables"),
        ("KEYQ_FOLLOW_ON", "write KEYQ_NAME=VALUE"),
        ("KEYQ_FOLLOW_ON=maybe", "KEYQ_FOLLOW_ON='maybe' is not a switch"),
        ("KEYQ_NAMESPACE=other", "the benchmark sets KEYQ_NAMESPACE itself"),
        ("KEYQ_DATABASE_URL=sqlite:///x.db", "the benchmark sets KEYQ_DATABASE_URL itself"),
        ("KEYQ_BATCH_MAX=512", "KEYQ_DEDUPE_WINDOW=256 is smaller than KEYQ_BATCH_MAX=512"),
    ],
)
def test_a_wrong_setting_is_refused_naming_it(pair: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        setting_changes([pair])


def test_the_printed_report_says_which_settings_were_changed() -> None:
    from keyq.bench.report import table

    changed = table({"config": {"workers": 2, "settings": ["KEYQ_FOLLOW_ON=0"]}})
    assert "keyq settings: KEYQ_FOLLOW_ON=0" in changed
    assert "keyq settings" not in table({"config": {"workers": 2, "settings": []}})


def test_a_plot_without_matplotlib_is_refused_before_the_run_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plain install has no matplotlib: the run used to crash at its end, its JSON unwritten.
    The servers' URLs point nowhere: the refusal comes before any of them is touched."""
    from keyq.bench import run

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    nowhere = [
        "--redis-url",
        "redis://127.0.0.1:1/0",
        "--pg-admin-url",
        "postgresql://x@127.0.0.1:1/p",
    ]
    assert run.main(["--smoke", "--plot", "out.png", *nowhere]) == 2
    err = capsys.readouterr().err
    assert "--plot out.png needs matplotlib" in err and "pip install 'keyq[bench]'" in err
