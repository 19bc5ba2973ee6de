"""Alembic wiring: keyq's migrations, recorded in keyq's own version table, run on an engine.

keyq shares its database with applications, and many of them run Alembic too. Alembic keeps a
history's current revision in one table, ``alembic_version`` by default; two histories in that
table each find a revision they cannot locate and refuse to run. So keyq records its revision in
``keyq_alembic_version`` and leaves ``alembic_version`` to the application, with one exception:
deployments made before the switch have keyq's revision in ``alembic_version``, and the first
upgrade moves it over (``_legacy_adoption``), touching no other row.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.schema import CreateTable, DropTable

from keyq.errors import RepoError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
VERSION_TABLE = "keyq_alembic_version"  # keyq's Alembic revision, apart from the application's
LEGACY_VERSION_TABLE = "alembic_version"  # where keyq kept its revision before; Alembic's default

_Statement = sa.Insert | sa.Delete | CreateTable | DropTable


def _version_table(name: str) -> sa.Table:
    # The shape Alembic itself creates (alembic.ddl.impl.version_table_impl), so that Alembic
    # reads and updates the table we create as if it had made it.
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("version_num", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("version_num", name=f"{name}_pkc"),
    )


def alembic_config(engine: Engine, output: TextIO | None = None) -> Config:
    """Alembic's configuration for keyq's history; env.py takes the engine from its attributes.

    ``output`` receives the SQL of an offline (``sql=True``) run instead of stdout.
    """
    config = Config(output_buffer=output) if output is not None else Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def head_revision(engine: Engine) -> str | None:
    """The newest revision of keyq's history (the history is one line: one head)."""
    return _script(engine).get_current_head()


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Upgrade the schema and return keyq's revision; safe on every start (a no-op at head).

    Not safe to run from two processes at once: callers serialise it (keyq.migrate_lock).
    """
    try:
        script = _script(engine)
        with engine.begin() as conn:  # the move and the upgrade each commit as a whole
            adoption = _legacy_adoption(conn, script)
            if adoption is not None:
                for statement in adoption.statements():
                    conn.execute(statement)
                log.info(
                    "moved keyq's revision %s from %s to %s%s",
                    ",".join(adoption.revisions),
                    LEGACY_VERSION_TABLE,
                    VERSION_TABLE,
                    f" and dropped the emptied {LEGACY_VERSION_TABLE}" if adoption.drop else "",
                )
        command.upgrade(alembic_config(engine), revision)
    except (SQLAlchemyError, CommandError) as e:
        raise RepoError(f"keyq's schema migration failed: {_first_line(e)}") from e
    return current_revision(engine)


def current_revision(engine: Engine) -> str | None:
    """keyq's revision in the database, or None before the first upgrade.

    A deployment whose revision still sits in ``alembic_version`` reports it from there: it is
    where the schema is, even though the next upgrade will move the record.
    """
    try:
        script = _script(engine)
        with engine.connect() as conn:
            heads = _current_heads(conn)
            if not heads:
                adoption = _legacy_adoption(conn, script)
                heads = adoption.revisions if adoption is not None else ()
    except (SQLAlchemyError, CommandError) as e:
        raise RepoError(f"cannot read keyq's schema revision: {_first_line(e)}") from e
    return _one(heads)


def upgrade_sql(engine: Engine) -> str:
    """The SQL an upgrade to head would run, for a DBA to review or apply; changes nothing.

    It starts from keyq's current revision (from the empty schema if there is none) and, on a
    deployment that still records keyq in ``alembic_version``, begins with the move.
    """
    output = io.StringIO()
    try:
        script = _script(engine)
        with engine.connect() as conn:  # reads the revision only
            heads = _current_heads(conn)
            adoption = None if heads else _legacy_adoption(conn, script)
            if adoption is not None:
                heads = adoption.revisions
                output.write(adoption.render(conn.dialect))
        start = _one(heads)
        target = f"{start}:head" if start else "head"
        command.upgrade(alembic_config(engine, output), target, sql=True)
    except (SQLAlchemyError, CommandError) as e:
        raise RepoError(f"cannot write keyq's upgrade SQL: {_first_line(e)}") from e
    return output.getvalue()


@dataclass(frozen=True)
class _Adoption:
    """keyq's revisions found in ``alembic_version``, to move into keyq's own table."""

    revisions: tuple[str, ...]
    create: bool  # keyq_alembic_version does not exist yet
    drop: bool  # nothing else is left in alembic_version: drop it

    def statements(self) -> list[_Statement]:
        """Create keyq's table if needed, move the rows, drop the legacy table if emptied.

        On SQLite the driver commits CREATE TABLE on its own; the empty table it may leave
        behind after a failure is harmless (the move is retried while it has no row).
        """
        ours, legacy = _version_table(VERSION_TABLE), _version_table(LEGACY_VERSION_TABLE)
        statements: list[_Statement] = []
        if self.create:
            statements.append(CreateTable(ours))
        statements.append(sa.insert(ours).values([{"version_num": r} for r in self.revisions]))
        statements.append(sa.delete(legacy).where(legacy.c.version_num.in_(self.revisions)))
        if self.drop:
            statements.append(DropTable(legacy))
        return statements

    def render(self, dialect: sa.Dialect) -> str:
        """The statements as literal SQL in one transaction, in the style of Alembic's output."""
        lines = ["BEGIN;", ""]
        for statement in self.statements():
            sql = statement.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
            lines += [f"{str(sql).strip()};", ""]
        return "\n".join([*lines, "COMMIT;", "", ""])


def _legacy_adoption(conn: Connection, script: ScriptDirectory) -> _Adoption | None:
    """What to move, if ``alembic_version`` holds keyq's revision and keyq's table has none.

    keyq's revisions are the ids in its own script directory; an application's rows are never
    selected, so they stay where they are.
    """
    inspector = sa.inspect(conn)
    if not inspector.has_table(LEGACY_VERSION_TABLE):
        return None
    has_ours = inspector.has_table(VERSION_TABLE)
    if has_ours and _current_heads(conn):
        return None
    legacy = _version_table(LEGACY_VERSION_TABLE)
    rows = [r for (r,) in conn.execute(sa.select(legacy.c.version_num))]
    known = {rev.revision for rev in script.walk_revisions()}
    revisions = tuple(sorted(r for r in rows if r in known))
    if not revisions:
        return None
    return _Adoption(revisions, create=not has_ours, drop=len(revisions) == len(rows))


def _current_heads(conn: Connection) -> tuple[str, ...]:
    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return context.get_current_heads()


def _script(engine: Engine) -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(engine))


def _one(heads: tuple[str, ...]) -> str | None:
    if len(heads) > 1:  # keyq's history is one line: several rows mean a hand-edited table
        raise RepoError(f"{VERSION_TABLE} holds several revisions {list(heads)}; keep one")
    return heads[0] if heads else None


def _first_line(e: Exception) -> str:
    # SQLAlchemy appends a "Background on this error" paragraph; the CLI prints one line.
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
