"""The Repo: durable entity state, fencing tokens and dead letters in SQL (SQLAlchemy 2 Core).

PostgreSQL (psycopg2) in production, SQLite as the embedded default. A commit is one
transaction that (1) checks and records the partition's fencing token, (2) upserts every changed
key with its version, applied message ids and token, refusing rows the Repo has seen a newer
token or version for, and (3) stores the batch's dead letters. The schema comes from Alembic
migrations (keyq/migrations); the tables here mirror it for queries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from keyq.entity import JSON
from keyq.errors import RepoError, StaleWriteError
from keyq.settings import redact_url

log = logging.getLogger(__name__)

metadata = sa.MetaData()
_json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

state_table = sa.Table(
    "keyq_state",
    metadata,
    sa.Column("entity", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(1024), primary_key=True),
    sa.Column("state", _json, nullable=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("fence", sa.BigInteger, nullable=False),
    sa.Column("recent_ids", _json, nullable=False),
    sa.Column("active", sa.Boolean, nullable=False, default=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

partition_table = sa.Table(
    "keyq_partition",
    metadata,
    sa.Column("partition", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("fence", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

dead_letter_table = sa.Table(
    "keyq_dead_letter",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("message_id", sa.String(128), nullable=False),
    sa.Column("entity", sa.String(128), nullable=False),
    sa.Column("key", sa.String(1024), nullable=False),
    sa.Column("op", sa.String(128), nullable=False),
    sa.Column("partition", sa.Integer, nullable=False),
    sa.Column("envelope", _json, nullable=True),
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("error_type", sa.String(256), nullable=False),
    sa.Column("error_message", sa.Text, nullable=False),
    sa.Column("traceback", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True, slots=True)
class StoredState:
    """A key's durable state as loaded from the Repo."""

    state: JSON
    version: int
    fence: int
    recent_ids: list[str]
    active: bool


@dataclass(frozen=True, slots=True)
class StateWrite:
    """The new durable state of one key after a batch."""

    entity: str
    key: str
    state: JSON
    version: int
    recent_ids: list[str]
    active: bool = True


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that could not be applied, kept with why."""

    message_id: str
    entity: str
    key: str
    op: str
    partition: int
    envelope: JSON
    reason: str  # "malformed" | "unknown" | "crashed"
    error_type: str
    error_message: str
    traceback: str = ""
    attempts: int = 0
    id: int | None = None
    created_at: datetime | None = field(default=None, compare=False)


def _now() -> datetime:
    return datetime.now(UTC)


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers and the one writer proceed together; busy_timeout rides out the lock.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def normalize_url(url: str) -> str:
    """Pin the psycopg2 driver (SQLAlchemy 2.1 would pick psycopg 3 for postgresql://)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


def make_engine(url: str) -> Engine:
    """An engine for PostgreSQL or SQLite with the settings keyq relies on."""
    url = normalize_url(url)
    try:
        if url.startswith("sqlite"):
            engine = sa.create_engine(url, connect_args={"timeout": 30})
            sa.event.listen(engine, "connect", _configure_sqlite)
        else:
            engine = sa.create_engine(
                url, pool_pre_ping=True, pool_size=4, max_overflow=4, pool_recycle=1800
            )
    except (SQLAlchemyError, ImportError, ValueError) as e:
        raise RepoError(f"cannot use database {redact_url(url)}: {e}") from e
    return engine


class Repo:
    """Durable state of every key; the single source of truth the cache is derived from."""

    def __init__(self, url: str, engine: Engine | None = None) -> None:
        self.url = url
        self.engine = engine or make_engine(url)
        self._dialect = self.engine.dialect.name
        self._insert: Any = postgresql.insert if self._dialect == "postgresql" else sqlite.insert

    def dispose(self) -> None:
        self.engine.dispose()

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent)."""
        from keyq.migrate import upgrade

        upgrade(self.engine)

    # --- reads -----------------------------------------------------------------------------

    def load(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], StoredState]:
        """Load the stored state of many keys of one or more entities in one query per entity."""
        by_entity: dict[str, list[str]] = {}
        for entity, key in keys:
            by_entity.setdefault(entity, []).append(key)
        found: dict[tuple[str, str], StoredState] = {}
        if not by_entity:
            return found
        t = state_table.c
        try:
            with self.engine.connect() as conn:
                for entity, key_list in by_entity.items():
                    for chunk_start in range(0, len(key_list), 500):
                        chunk = key_list[chunk_start : chunk_start + 500]
                        rows = conn.execute(
                            sa.select(
                                t.key, t.state, t.version, t.fence, t.recent_ids, t.active
                            ).where(t.entity == entity, t.key.in_(chunk))
                        )
                        for row in rows:
                            found[(entity, row.key)] = StoredState(
                                row.state, row.version, row.fence, list(row.recent_ids), row.active
                            )
        except SQLAlchemyError as e:
            raise RepoError(
                f"loading {sum(map(len, by_entity.values()))} key(s) failed: {e}"
            ) from e
        return found

    def load_one(self, entity: str, key: str) -> StoredState | None:
        return self.load([(entity, key)]).get((entity, key))

    def partition_fence(self, partition: int) -> int:
        """The highest fencing token the Repo has seen for a partition (0: none)."""
        try:
            with self.engine.connect() as conn:
                value = conn.execute(
                    sa.select(partition_table.c.fence).where(
                        partition_table.c.partition == partition
                    )
                ).scalar()
        except SQLAlchemyError as e:
            raise RepoError(f"reading the fence of partition {partition} failed: {e}") from e
        return int(value or 0)

    # --- writes ----------------------------------------------------------------------------

    def _check_fence(self, conn: Connection, partition: int, fence: int) -> None:
        stmt = self._insert(partition_table).values(
            partition=partition, fence=fence, updated_at=_now()
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[partition_table.c.partition],
            set_={"fence": stmt.excluded.fence, "updated_at": stmt.excluded.updated_at},
            where=partition_table.c.fence <= stmt.excluded.fence,
        ).returning(partition_table.c.partition)
        if conn.execute(stmt).first() is None:
            raise StaleWriteError(
                f"partition {partition}: fencing token {fence} is older than the Repo's; "
                "another node owns this partition now"
            )

    def record_fence(self, partition: int, fence: int) -> None:
        """Record a newly granted token, so any older owner's pending write is refused."""
        try:
            with self.engine.begin() as conn:
                self._check_fence(conn, partition, fence)
        except SQLAlchemyError as e:
            raise RepoError(f"recording fence {fence} of partition {partition} failed: {e}") from e

    def commit(
        self,
        partition: int,
        fence: int,
        writes: Sequence[StateWrite],
        dead_letters: Sequence[DeadLetter] = (),
    ) -> None:
        """One transaction for a batch; StaleWriteError if a newer owner or version exists."""
        if not writes and not dead_letters:
            return
        now = _now()
        try:
            with self.engine.begin() as conn:
                self._check_fence(conn, partition, fence)
                if writes:
                    rows = [
                        {
                            "entity": w.entity,
                            "key": w.key,
                            "state": w.state,
                            "version": w.version,
                            "fence": fence,
                            "recent_ids": w.recent_ids,
                            "active": w.active,
                            "updated_at": now,
                        }
                        for w in writes
                    ]
                    stmt = self._insert(state_table)
                    ex = stmt.excluded
                    stmt = stmt.on_conflict_do_update(
                        index_elements=[state_table.c.entity, state_table.c.key],
                        set_={
                            "state": ex.state,
                            "version": ex.version,
                            "fence": ex.fence,
                            "recent_ids": ex.recent_ids,
                            "active": ex.active,
                            "updated_at": ex.updated_at,
                        },
                        where=(state_table.c.fence <= ex.fence)
                        & (state_table.c.version < ex.version),
                    ).returning(state_table.c.entity, state_table.c.key)
                    accepted = conn.execute(stmt, rows).all()
                    if len(accepted) != len(rows):
                        got = {(r.entity, r.key) for r in accepted}
                        refused = [
                            (w.entity, w.key) for w in writes if (w.entity, w.key) not in got
                        ]
                        raise StaleWriteError(
                            f"partition {partition}: {len(refused)} key write(s) refused "
                            f"(newer version or token in the Repo), e.g. {refused[:3]}"
                        )
                if dead_letters:
                    conn.execute(
                        sa.insert(dead_letter_table),
                        [
                            {
                                "message_id": d.message_id,
                                "entity": d.entity[:128],
                                "key": d.key[:1024],
                                "op": d.op[:128],
                                "partition": d.partition,
                                "envelope": d.envelope,
                                "reason": d.reason,
                                "error_type": d.error_type[:256],
                                "error_message": d.error_message,
                                "traceback": d.traceback,
                                "attempts": d.attempts,
                                "created_at": now,
                            }
                            for d in dead_letters
                        ],
                    )
        except StaleWriteError:
            raise
        except SQLAlchemyError as e:
            raise RepoError(f"commit of partition {partition} failed: {e}") from e

    # --- dead letters ----------------------------------------------------------------------

    def dead_letters(
        self,
        *,
        entity: str | None = None,
        key: str | None = None,
        reason: str | None = None,
        limit: int = 100,
        ids: Sequence[int] | None = None,
    ) -> list[DeadLetter]:
        t = dead_letter_table.c
        query = sa.select(dead_letter_table).order_by(t.id).limit(limit)
        if entity is not None:
            query = query.where(t.entity == entity)
        if key is not None:
            query = query.where(t.key == key)
        if reason is not None:
            query = query.where(t.reason == reason)
        if ids is not None:
            query = query.where(t.id.in_(list(ids)))
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
        except SQLAlchemyError as e:
            raise RepoError(f"reading dead letters failed: {e}") from e
        return [
            DeadLetter(
                id=r.id,
                message_id=r.message_id,
                entity=r.entity,
                key=r.key,
                op=r.op,
                partition=r.partition,
                envelope=r.envelope,
                reason=r.reason,
                error_type=r.error_type,
                error_message=r.error_message,
                traceback=r.traceback,
                attempts=r.attempts,
                created_at=r.created_at,
            )
            for r in rows
        ]

    def purge_dead_letters(
        self,
        *,
        entity: str | None = None,
        key: str | None = None,
        reason: str | None = None,
        ids: Sequence[int] | None = None,
        everything: bool = False,
    ) -> int:
        """Delete dead letters matching a filter; refuses an empty filter unless everything."""
        t = dead_letter_table.c
        stmt = sa.delete(dead_letter_table)
        conditions: list[Any] = []
        if entity is not None:
            conditions.append(t.entity == entity)
        if key is not None:
            conditions.append(t.key == key)
        if reason is not None:
            conditions.append(t.reason == reason)
        if ids is not None:
            conditions.append(t.id.in_(list(ids)))
        if not conditions and not everything:
            raise ValueError("purge needs a filter (entity, key, reason or ids) or everything=True")
        if conditions:
            stmt = stmt.where(sa.and_(*conditions))
        try:
            with self.engine.begin() as conn:
                return int(conn.execute(stmt).rowcount or 0)
        except SQLAlchemyError as e:
            raise RepoError(f"purging dead letters failed: {e}") from e

    def count_states(self) -> int:
        try:
            with self.engine.connect() as conn:
                return int(
                    conn.execute(sa.select(sa.func.count()).select_from(state_table)).scalar() or 0
                )
        except SQLAlchemyError as e:
            raise RepoError(f"counting states failed: {e}") from e


def wait_for_repo(repo: Repo, timeout_s: float) -> None:
    """Block until the database answers, or raise RepoError naming it after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with repo.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return
        except SQLAlchemyError as e:
            if time.monotonic() > deadline:
                raise RepoError(f"database {redact_url(repo.url)} is not answering: {e}") from e
            time.sleep(0.2)
