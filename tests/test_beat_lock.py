"""Two beats started by mistake never run the reconciler twice at once (a Redis lock per run)."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from keyq import metrics
from keyq.reconciler import FAULT_RECONCILE_SLEEP, Reconciler, ReconcileReport
from keyq.settings import Settings
from tests.conftest import ROOT, WorkerFactory, poll, settings_env

SKIP_LINE = re.compile(r"keyq reconcile skipped reason=locked holder=b'(\d+)-")
RUN_LINE = re.compile(r"keyq reconcile names_released=.* started=([\d.]+) finished=([\d.]+)")


def test_second_run_is_skipped_while_a_slow_run_holds_the_lock(
    settings: Settings, redis_client: redis.Redis
) -> None:
    inside, release = threading.Event(), threading.Event()

    def slow_hold() -> None:
        inside.set()
        assert release.wait(20), "the test never released the slow run"

    slow = Reconciler(settings, hold=slow_hold)
    fast = Reconciler(settings)
    results: dict[str, ReconcileReport] = {}
    thread = threading.Thread(target=lambda: results.update(slow=slow.run_once()))
    skipped_before = metrics.reconcile_skipped._value.get()
    try:
        thread.start()
        assert inside.wait(20)
        racing = threading.Thread(target=lambda: results.update(fast=fast.run_once()))
        racing.start()
        racing.join(20)
        assert results["fast"].ran is False
        assert results["fast"].skipped_reason == "another reconciler is running"
        assert metrics.reconcile_skipped._value.get() - skipped_before == 1
        release.set()
        thread.join(20)
        assert results["slow"].ran is True
        assert fast.run_once().ran is True  # the lock was released at the end of the run
    finally:
        release.set()
        thread.join(20)
        slow.close()
        fast.close()


@pytest.mark.integration
def test_two_beats_and_two_workers_never_overlap_reconciler_runs(
    start_worker: WorkerFactory, settings: Settings, tmp_path: Path
) -> None:
    """Two `keyq beat` processes every 0.5 s, two workers, each run forced to take 0.3 s: the
    workers' run lines (wall-clock start and end) never overlap, and some runs were skipped."""
    slow = {FAULT_RECONCILE_SLEEP: "0.3"}
    workers = [start_worker(env=slow), start_worker(env=slow)]
    env = settings_env(settings)
    env["KEYQ_RECONCILE_INTERVAL_S"] = "0.5"
    env["KEYQ_CACHE_SWEEP_INTERVAL_S"] = "60"
    beats: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(2):
            with (tmp_path / f"beat-{i}.log").open("wb") as log_file:
                beats.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "keyq",
                            "beat",
                            "--schedule",
                            str(tmp_path / f"beat-{i}.schedule"),
                        ],
                        env=env,
                        cwd=str(ROOT),
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                    )
                )

        def runs() -> list[tuple[float, float]]:
            return [
                (float(m.group(1)), float(m.group(2)))
                for w in workers
                for m in RUN_LINE.finditer(w.log())
            ]

        def skipped() -> int:
            return sum(w.log().count("keyq reconcile skipped") for w in workers)

        poll(lambda: len(runs()) >= 8 and skipped() >= 2, timeout=60, what="8 runs, 2 skips")
    finally:
        for beat in beats:
            beat.kill()
            beat.wait(10)
    ordered = sorted(runs())
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(ordered)), ordered
    # the exclusion is across processes: some run was refused because the OTHER worker held it
    pids = {w.pid for w in workers}
    refused_by_other = [
        (w.pid, int(m.group(1)))
        for w in workers
        for m in SKIP_LINE.finditer(w.log())
        if int(m.group(1)) != w.pid and int(m.group(1)) in pids
    ]
    assert refused_by_other, "no run was skipped because another worker process held the lock"
