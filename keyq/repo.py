"""The Repo: durable entity state, fencing tokens and dead letters in SQL (SQLAlchemy 2 Core).

PostgreSQL (psycopg2) in production, SQLite as the embedded default. A commit is one
transaction that (1) checks and records the partition's fencing token, (2) upserts every changed
key with its version, applied message ids and token, refusing rows the Repo has seen a newer
token or version for, and (3) stores the batch's dead letters. The schema comes from Alembic
migrations (keyq/migrations); the tables here mirror it for queries.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from keyq import fast_json, metrics
from keyq.connections import DEFAULT_TIMEOUTS, Timeouts, engine_options
from keyq.entity import JSON
from keyq.errors import RepoDataError, RepoError, StaleWriteError
from keyq.pg_write import GATED_UPSERT, write_in_one_statement
from keyq.records import (  # re-exported: the Repo's API takes and returns these records
    DeadLetter as DeadLetter,
)
from keyq.records import StateWrite as StateWrite
from keyq.records import StoredState as StoredState
from keyq.records import TimerChange as TimerChange
from keyq.records import TimerDelete as TimerDelete
from keyq.records import TimerRow as TimerRow
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
    sa.Index("ix_keyq_state_active", "entity", "active"),
)

# PostgreSQL's commit of a batch: the partitions' fencing tokens recorded (unless the Repo has a
# newer one) and the keys' states written (unless it has a newer token or version for them), in
# one statement; the states only if every partition passed. (SQLite: two statements.)

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
    sa.Column("raw", sa.Text, nullable=True),  # the broker message's bytes, base64
    sa.Column("deliveries", sa.Integer, nullable=False, server_default="0"),
    sa.Index("ix_keyq_dead_letter_entity_key", "entity", "key"),
)


timer_table = sa.Table(
    "keyq_timer",
    metadata,
    sa.Column("entity", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(1024), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("timer_id", sa.String(32), nullable=False),
    sa.Column("partition", sa.Integer, nullable=False),
    sa.Column("due_ms", sa.BigInteger, nullable=False),
    sa.Column("op", sa.String(64), nullable=False),
    sa.Column("payload", _json, nullable=True),
    sa.Column("every_ms", sa.BigInteger, nullable=True),
    sa.Column("catch_up", sa.String(16), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_keyq_timer_due", "partition", "due_ms"),
)


_TRANSIENT = (
    sa.exc.OperationalError,  # connection lost or refused, server restarting, statement timeout
    sa.exc.InterfaceError,
    sa.exc.DisconnectionError,
    sa.exc.TimeoutError,  # no pooled connection within the wait
)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _timed(op: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Time a Repo call into keyq_repo_seconds{op} (failed calls too)."""
    histogram = metrics.repo_seconds.labels(op)

    def wrap(fn: Callable[_P, _R]) -> Callable[_P, _R]:
        @wraps(fn)
        def timed(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                histogram.observe(time.perf_counter() - started)

        return timed

    return wrap


def repo_error(e: BaseException, what: str) -> RepoError:
    """RepoError for an outage (worth waiting out), RepoDataError for data the database
    refuses (a retry cannot help: the batch fails and its poison is isolated)."""
    if isinstance(e, _TRANSIENT) or (
        isinstance(e, sa.exc.DBAPIError) and e.connection_invalidated
    ):
        return RepoError(f"{what} failed: {e}")
    return RepoDataError(f"{what} failed, the database refused the data: {e}")


def _dead_letter_row(d: DeadLetter, now: datetime) -> dict[str, Any]:
    return {
        "message_id": _text(d.message_id, 128),
        "entity": _text(d.entity, 128),
        "key": _text(d.key, 1024),
        "op": _text(d.op, 128),
        "partition": d.partition,
        "envelope": _storable_json(d.envelope),
        "reason": _text(d.reason, 32),
        "error_type": _text(d.error_type, 256),
        "error_message": _text(d.error_message),
        "traceback": _text(d.traceback),
        "attempts": d.attempts,
        "created_at": now,
        "raw": d.raw,
        "deliveries": d.deliveries,
    }


def _now() -> datetime:
    return datetime.now(UTC)


def _text(value: object, limit: int | None = None) -> str:
    """Dead-letter text as any database can store it: NUL and lone surrogates spelled out,
    cut to the column (a poison message's fields must never make its dead letter fail)."""
    text = value if isinstance(value, str) else repr(value)
    text = text.replace("\x00", "\\x00")
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if limit is None else text[:limit]


def _storable_json(value: JSON) -> JSON:
    """A dead letter's envelope as PostgreSQL's JSONB can store it (it refuses \\u0000 and
    lone surrogates); what it cannot hold is kept as text (the raw column has the bytes)."""
    try:
        encoded = json.dumps(value, allow_nan=False)
        encoded.encode("utf-8")  # lone surrogates survive json.dumps as escapes only
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError):
        return _text(value)
    if "\\u0000" not in encoded:
        return value
    return json.loads(encoded.replace("\\u0000", "\\\\u0000"))


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers and the one writer proceed together; the driver's timeout (connect_args,
    # keyq.connections) rides out another writer's lock.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def normalize_url(url: str) -> str:
    """Pin the psycopg2 driver (SQLAlchemy 2.1 would pick psycopg 3 for postgresql://)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


def make_engine(
    url: str, pre_ping: bool = True, timeouts: Timeouts = DEFAULT_TIMEOUTS
) -> Engine:
    """An engine for PostgreSQL or SQLite with the settings keyq relies on.

    pre_ping costs a round trip per checkout; workers turn it off because they retry a failed
    batch anyway (a dropped connection is replaced on the next try). Connect and statement
    limits come from keyq.connections.
    """
    url = normalize_url(url)
    options = engine_options(url, timeouts)
    try:
        if url.startswith("sqlite"):
            engine = sa.create_engine(url, **options)
            sa.event.listen(engine, "connect", _configure_sqlite)
        else:
            engine = sa.create_engine(
                url,
                pool_pre_ping=pre_ping,
                pool_size=4,
                max_overflow=4,
                pool_recycle=1800,
                **options,
            )
    except (SQLAlchemyError, ImportError, ValueError) as e:
        raise RepoError(f"cannot use database {redact_url(url)}: {e}") from e
    return engine


class Repo:
    """Durable state of every key; the single source of truth the cache is derived from."""

    def __init__(
        self,
        url: str,
        engine: Engine | None = None,
        *,
        pre_ping: bool = True,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        self.url = url
        self.engine = engine or make_engine(url, pre_ping=pre_ping, timeouts=timeouts)
        self._dialect = self.engine.dialect.name
        self._insert: Any = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        # Built once: constructing these per commit cost more CPU than running them.
        self._fence_stmt = self._build_fence_stmt()
        self._grant_stmt = self._build_fence_stmt(strict=True)
        self._upsert_stmt = self._build_upsert_stmt()

    def _build_fence_stmt(self, strict: bool = False) -> Any:
        """Record a partition's token unless the Repo has a newer one (strict: unless it has
        seen this one or a newer one); RETURNING says which partitions passed."""
        stmt = self._insert(partition_table).values(
            partition=sa.bindparam("p"), fence=sa.bindparam("f"), updated_at=sa.bindparam("t")
        )
        current, new = partition_table.c.fence, stmt.excluded.fence
        return stmt.on_conflict_do_update(
            index_elements=[partition_table.c.partition],
            set_={"fence": stmt.excluded.fence, "updated_at": stmt.excluded.updated_at},
            where=(current < new) if strict else (current <= new),
        ).returning(partition_table.c.partition)

    def _build_upsert_stmt(self) -> Any:
        """Write keys' states unless the Repo has a newer token or version for them."""
        stmt = self._insert(state_table)
        ex = stmt.excluded
        return stmt.on_conflict_do_update(
            index_elements=[state_table.c.entity, state_table.c.key],
            set_={
                "state": ex.state,
                "version": ex.version,
                "fence": ex.fence,
                "recent_ids": ex.recent_ids,
                "active": ex.active,
                "updated_at": ex.updated_at,
            },
            where=(state_table.c.fence <= ex.fence) & (state_table.c.version < ex.version),
        ).returning(state_table.c.entity, state_table.c.key)

    def dispose(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """One round trip to the database; RepoError if it does not answer."""
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except SQLAlchemyError as e:
            raise repo_error(e, "ping") from e

    def migrate(self) -> str | None:
        """Bring the schema to the newest Alembic revision (idempotent); returns that revision."""
        from keyq.migrate import upgrade

        return upgrade(self.engine)

    # --- reads -----------------------------------------------------------------------------

    @_timed("load")
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
                                row.state, row.version, row.fence, row.recent_ids, row.active
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
        self._check_fences(conn, [(partition, fence)])

    def _gated_upsert(
        self,
        conn: Connection,
        fences: Sequence[tuple[int, int]],
        rows: list[dict[str, Any]],
        now: datetime,
    ) -> list[Any]:
        """PostgreSQL: record the fences and write the states in ONE statement (one round trip
        less per commit): the states are written only if every partition's token passed (the
        CTE's RETURNING says which); a refused fence shows as rows not written."""
        accepted = conn.execute(
            GATED_UPSERT,
            {
                "parts": [p for p, _ in fences],
                "fences": [f for _, f in fences],
                "nparts": len(fences),
                "now": now,
                "rows": fast_json.dumps_checked(rows),  # as the fast path writes them
            },
        ).all()
        if len(accepted) != len(rows):  # which: a fence (then nothing was written) or a key
            self._check_fences(conn, fences)
        return list(accepted)

    def _check_fences(self, conn: Connection, fences: Sequence[tuple[int, int]]) -> None:
        """Record every (partition, token) in one statement; refuse if any is stale."""
        now = _now()
        params = [{"p": p, "f": f, "t": now} for p, f in fences]
        if len(params) == 1:
            accepted = {row.partition for row in conn.execute(self._fence_stmt, params[0])}
        else:
            accepted = {row.partition for row in conn.execute(self._fence_stmt, params).all()}
        for p, f in fences:
            if p not in accepted:
                raise StaleWriteError(
                    f"partition {p}: fencing token {f} is older than the Repo's; "
                    "another node owns this partition now"
                )

    def record_fence(self, partition: int, fence: int) -> None:
        """Record a newly granted token, so any older owner's pending write is refused.

        A grant must be strictly newer than every token the Repo has seen: after Redis lost its
        counters (a restart without persistence) it could hand out a number already used, and
        two owners with one token could not be told apart. StaleWriteError then.
        """
        try:
            with self.engine.begin() as conn:
                if (
                    conn.execute(
                        self._grant_stmt, {"p": partition, "f": fence, "t": _now()}
                    ).first()
                    is None
                ):
                    raise StaleWriteError(
                        f"partition {partition}: token {fence} was already granted or is older "
                        "than the Repo's; the fence counter must move past it"
                    )
        except SQLAlchemyError as e:
            raise RepoError(f"recording fence {fence} of partition {partition} failed: {e}") from e

    @_timed("commit")
    def commit(
        self,
        partition: int,
        fence: int,
        writes: Sequence[StateWrite],
        dead_letters: Sequence[DeadLetter] = (),
        timers: Sequence[TimerChange] = (),
        others: Sequence[tuple[int, int, Sequence[StateWrite]]] = (),
    ) -> None:
        """One transaction for a batch; StaleWriteError if a newer owner or version exists.

        ``others`` are (partition, fence, writes) of more partitions committed in the same
        transaction (cross-partition group commit: one fsync for all), each fence checked.

        Timer changes (set, rescheduled, fired or cancelled) go in the same transaction as the
        state that made them, so a timer is created, and consumed, exactly once.
        """
        fenced = [(partition, fence, writes), *others]
        writes = [w for _, _, ws in fenced for w in ws]
        if not writes and not dead_letters and not timers:
            return
        now = _now()
        gated = bool(writes) and self._dialect == "postgresql"
        fences = [(p, f) for p, f, _ in fenced]
        rows = [
            {
                "entity": w.entity,
                "key": w.key,
                "state": w.state,
                "version": w.version,
                "fence": f,  # a key's row carries its own partition's token
                "recent_ids": w.recent_ids,
                "active": w.active,
            }
            for _, f, ws in fenced
            for w in ws
        ]
        one_statement = gated and not dead_letters and not timers  # states only: no BEGIN
        if one_statement and write_in_one_statement(self.engine, fences, rows, now):
            return
        try:
            with self.engine.begin() as conn:
                if not gated:  # PostgreSQL checks the fences in the write's own statement
                    self._check_fences(conn, fences)
                if writes:
                    if gated:
                        accepted = self._gated_upsert(conn, fences, rows, now)
                    else:
                        stamped = [{**r, "updated_at": now} for r in rows]
                        accepted = list(conn.execute(self._upsert_stmt, stamped).all())
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
                        [_dead_letter_row(d, now) for d in dead_letters],
                    )
                if timers:
                    self._write_timers(conn, timers, now)
        except StaleWriteError:
            raise
        except (SQLAlchemyError, UnicodeError, ValueError, TypeError) as e:
            raise repo_error(e, f"commit of partition {partition}") from e

    def record_dead_letters(self, dead_letters: Sequence[DeadLetter]) -> None:
        """Dead letters of messages that belong to no partition (no fence to check)."""
        if not dead_letters:
            return
        try:
            with self.engine.begin() as conn:
                rows = [_dead_letter_row(d, _now()) for d in dead_letters]
                conn.execute(sa.insert(dead_letter_table), rows)
        except (SQLAlchemyError, UnicodeError, ValueError, TypeError) as e:
            raise repo_error(e, "recording dead letters") from e

    def _write_timers(
        self, conn: Connection, changes: Sequence[TimerChange], now: datetime
    ) -> None:
        t = timer_table.c
        last: dict[tuple[str, str, str], TimerChange] = {}
        for change in changes:  # ON CONFLICT cannot touch a row twice: the last change wins
            last[(change.entity, change.key, change.name)] = change
        deletes = [c for c in last.values() if isinstance(c, TimerDelete)]
        upserts = [c for c in last.values() if isinstance(c, TimerRow)]
        by_name = sa.delete(timer_table).where(
            t.entity == sa.bindparam("e"), t.key == sa.bindparam("k"), t.name == sa.bindparam("n")
        )
        plain = [{"e": d.entity, "k": d.key, "n": d.name} for d in deletes if d.timer_id is None]
        if plain:
            conn.execute(by_name, plain)
        exact = [
            {"e": d.entity, "k": d.key, "n": d.name, "i": d.timer_id}
            for d in deletes
            if d.timer_id is not None
        ]
        if exact:
            conn.execute(by_name.where(t.timer_id == sa.bindparam("i")), exact)
        if upserts:
            stmt = self._insert(timer_table)
            ex = stmt.excluded
            columns = ("timer_id", "partition", "due_ms", "op", "payload", "every_ms", "catch_up")
            stmt = stmt.on_conflict_do_update(
                index_elements=[t.entity, t.key, t.name],
                set_={**{c: getattr(ex, c) for c in columns}, "updated_at": ex.updated_at},
            ).returning(t.name)  # with RETURNING, SQLAlchemy sends one multi-VALUES statement
            conn.execute(
                stmt,
                [
                    {
                        "entity": r.entity,
                        "key": r.key,
                        "name": r.name,
                        "timer_id": r.timer_id,
                        "partition": r.partition,
                        "due_ms": r.due_ms,
                        "op": r.op,
                        "payload": r.payload,
                        "every_ms": r.every_ms,
                        "catch_up": r.catch_up,
                        "updated_at": now,
                    }
                    for r in upserts
                ],
            ).all()

    # --- timers ----------------------------------------------------------------------------

    @_timed("load_timers")
    def load_timers(
        self, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, TimerRow]]:
        """The pending timers of some keys, by key then timer name."""
        by_entity: dict[str, list[str]] = {}
        for entity, key in keys:
            by_entity.setdefault(entity, []).append(key)
        found: dict[tuple[str, str], dict[str, TimerRow]] = {}
        t = timer_table.c
        try:
            with self.engine.connect() as conn:
                for entity, key_list in by_entity.items():
                    for start in range(0, len(key_list), 500):
                        rows = conn.execute(
                            sa.select(timer_table).where(
                                t.entity == entity, t.key.in_(key_list[start : start + 500])
                            )
                        )
                        for row in rows:
                            found.setdefault((entity, row.key), {})[row.name] = _timer(row)
        except SQLAlchemyError as e:
            raise RepoError(f"loading the timers of {len(found)} key(s) failed: {e}") from e
        return found

    def clock_ms(self) -> int:
        """The database's clock in epoch milliseconds: the one clock timers are due by.

        Every worker reads it (``keyq.timers.SharedClock``) instead of trusting its own wall
        clock. SQLite is embedded: its clock is the clock of the one host it runs on.
        """
        if self._dialect == "postgresql":
            query = sa.text("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
        else:
            query = sa.text("SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)")
        try:
            with self.engine.connect() as conn:
                return int(conn.execute(query).scalar_one())
        except SQLAlchemyError as e:
            raise repo_error(e, "reading the database clock") from e

    @_timed("due_timers")
    def poll_timers(
        self, partitions: Iterable[int], now_ms: int, limit: int
    ) -> tuple[list[TimerRow], int | None]:
        """Timers of these partitions due at now_ms, at most `limit`, in due order: by due_ms,
        then timer_id (a total order, as Python compares the pair: the poller relies on it);
        and when the first of their timers that is not due yet is due (None: they have no
        other), before which the poller asks nothing more.

        now_ms comes from ``clock_ms`` (the database's clock) on a worker."""
        parts = sorted(set(partitions))
        if not parts or limit <= 0:
            return [], None
        t = timer_table.c
        # byte order on PostgreSQL whatever the database's collation (SQLite's is binary)
        timer_id = t.timer_id.collate("C") if self._dialect == "postgresql" else t.timer_id
        in_parts = t.partition.in_(parts)
        due = (
            sa.select(timer_table)
            .where(in_parts, t.due_ms <= now_ms)
            .order_by(t.due_ms, timer_id)
            .limit(limit)
        )
        later = sa.select(sa.func.min(t.due_ms)).where(in_parts, t.due_ms > now_ms)
        try:
            with self.engine.connect() as conn:
                rows = [_timer(row) for row in conn.execute(due)]
                next_due = conn.execute(later).scalar()
        except SQLAlchemyError as e:
            raise RepoError(f"polling due timers failed: {e}") from e
        return rows, None if next_due is None else int(next_due)

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
                raw=r.raw,
                deliveries=r.deliveries,
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


def _timer(row: Any) -> TimerRow:
    return TimerRow(
        entity=row.entity,
        key=row.key,
        name=row.name,
        timer_id=row.timer_id,
        partition=row.partition,
        due_ms=int(row.due_ms),
        op=row.op,
        payload=row.payload,
        every_ms=None if row.every_ms is None else int(row.every_ms),
        catch_up=row.catch_up,
    )


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
