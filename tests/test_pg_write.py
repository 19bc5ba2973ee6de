"""keyq.pg_write: the one-statement commit on PostgreSQL is all or nothing, survives a lost
connection, and the Repo still names what a refused commit refused."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg2
import pytest

from keyq.errors import StaleWriteError
from keyq.pg_write import write_in_one_statement
from keyq.repo import Repo, StateWrite
from tests.ownership_helpers import database_url  # noqa: F401  (PostgreSQL only)


@pytest.fixture
def pg_repo(database_url: str) -> Iterator[Repo]:  # noqa: F811  (PostgreSQL only, empty tables)
    repo = Repo(database_url, pre_ping=False)
    yield repo
    repo.dispose()


def _row(key: str, n: int, version: int, fence: int) -> dict[str, object]:
    return {
        "entity": "counter",
        "key": key,
        "state": {"n": n},
        "version": version,
        "fence": fence,
        "recent_ids": [f"m{version}"],
        "active": True,
    }


def _fences(repo: Repo) -> dict[int, int]:
    with repo.engine.connect() as conn:
        return {
            int(p): int(f)
            for p, f in conn.exec_driver_sql("SELECT partition, fence FROM keyq_partition").all()
        }


def test_one_statement_writes_every_row_and_fence(pg_repo: Repo) -> None:
    now = datetime.now(UTC)
    rows = [_row("a", 1, 1, 3), _row("b", 2, 1, 4)]
    assert write_in_one_statement(pg_repo.engine, [(0, 3), (1, 4)], rows, now)
    assert pg_repo.load_one("counter", "a").state == {"n": 1}  # type: ignore[union-attr]
    assert pg_repo.load_one("counter", "b").state == {"n": 2}  # type: ignore[union-attr]
    assert _fences(pg_repo) == {0: 3, 1: 4}
    # the same statement again on the same pooled connection (prepared once): a new version
    assert write_in_one_statement(pg_repo.engine, [(0, 3)], [_row("a", 5, 2, 3)], now)
    assert pg_repo.load_one("counter", "a").state == {"n": 5}  # type: ignore[union-attr]


def test_a_refused_fence_or_key_leaves_nothing_written(pg_repo: Repo) -> None:
    now = datetime.now(UTC)
    assert write_in_one_statement(pg_repo.engine, [(0, 5), (1, 5)], [_row("a", 1, 1, 5)], now)
    # partition 1 has token 5 recorded: token 4 is stale, so partition 0's newer token 6 and
    # key b must not be written either (a group commit is all or nothing)
    refused = write_in_one_statement(
        pg_repo.engine, [(0, 6), (1, 4)], [_row("a", 2, 2, 6), _row("b", 1, 1, 4)], now
    )
    assert refused is False
    assert _fences(pg_repo) == {0: 5, 1: 5}
    assert pg_repo.load_one("counter", "a").state == {"n": 1}  # type: ignore[union-attr]
    assert pg_repo.load_one("counter", "b") is None
    # a key whose version is not newer: the fences of the same statement stay unwritten too
    assert not write_in_one_statement(pg_repo.engine, [(0, 7)], [_row("a", 9, 1, 7)], now)
    assert _fences(pg_repo)[0] == 5
    # through the Repo: the transactional path names what was refused
    with pytest.raises(StaleWriteError, match="fencing token 4 is older"):
        pg_repo.commit(1, 4, [StateWrite("counter", "b", {"n": 1}, 1, ["x"])])
    with pytest.raises(StaleWriteError, match="key write"):
        pg_repo.commit(0, 7, [StateWrite("counter", "a", {"n": 9}, 1, ["y"])])


def test_a_lost_connection_falls_back_and_the_next_commit_prepares_again(
    pg_repo: Repo, pg_database_url: str
) -> None:
    pg_repo.commit(0, 1, [StateWrite("counter", "a", {"n": 1}, 1, ["m1"])])
    name = pg_database_url.rsplit("/", 1)[1]
    admin = psycopg2.connect(pg_database_url.rsplit("/", 1)[0] + "/postgres")
    admin.autocommit = True
    with admin.cursor() as cur:  # every pooled connection of the Repo dies
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
    admin.close()
    # the dead connection is dropped (invalidated, not returned to the pool), and the
    # transactional path lands the commit on a new one, where the next commit prepares again
    for version in (2, 3):
        pg_repo.commit(0, 1, [StateWrite("counter", "a", {"n": version}, version, ["m"])])
    assert pg_repo.load_one("counter", "a").state == {"n": 3}  # type: ignore[union-attr]
    assert write_in_one_statement(pg_repo.engine, [(0, 1)], [_row("a", 4, 4, 1)], datetime.now(UTC))
