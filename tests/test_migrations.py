"""keyq's schema history lives beside an application's: its own Alembic version table, an old
deployment moved out of ``alembic_version``, SQL for a DBA, and migrations that match the ORM."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from keyq.migrate import (
    LEGACY_VERSION_TABLE,
    VERSION_TABLE,
    alembic_config,
    current_revision,
    head_revision,
    upgrade,
)
from keyq.repo import make_engine, metadata, normalize_url
from keyq.settings import Settings
from tests.conftest import PG_ADMIN_URL, ROOT, settings_env

APP_TABLE = "app_orders"

APP_ENV_PY = """\
import os

import sqlalchemy as sa
from alembic import context

engine = sa.create_engine(os.environ["APP_DATABASE_URL"])
with engine.begin() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
"""

APP_SCRIPT_MAKO = '''\
"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
"""
import sqlalchemy as sa
from alembic import op

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = None
depends_on = None


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
'''

APP_REVISION = f'''\
"""The application's orders.

Revision ID: app001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "app001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "{APP_TABLE}",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("item", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("{APP_TABLE}")
'''


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def new_pg_url() -> Iterator[Callable[[], str]]:
    """A factory of empty PostgreSQL databases (no keyq schema), dropped after the test."""
    admin = psycopg2.connect(PG_ADMIN_URL)
    admin.autocommit = True
    names: list[str] = []

    def create() -> str:
        name = f"keyq_mig_{uuid.uuid4().hex[:10]}"
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        names.append(name)
        return f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"

    yield create
    with admin.cursor() as cur:
        for name in names:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.close()


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path, new_pg_url: Callable[[], str]) -> str:
    """An empty database on PostgreSQL and on SQLite."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    return new_pg_url()


@pytest.fixture
def engine(empty_url: str) -> Iterator[Engine]:
    e = make_engine(empty_url)
    yield e
    e.dispose()


@pytest.fixture
def app_ini(tmp_path: Path) -> Path:
    """An application's own Alembic environment, as its team would write it."""
    scripts = tmp_path / "app_migrations"
    (scripts / "versions").mkdir(parents=True)
    (scripts / "env.py").write_text(APP_ENV_PY)
    (scripts / "script.py.mako").write_text(APP_SCRIPT_MAKO)
    (scripts / "versions" / "app001_orders.py").write_text(APP_REVISION)
    ini = tmp_path / "alembic.ini"
    ini.write_text(
        textwrap.dedent(
            """\
            [alembic]
            script_location = %(here)s/app_migrations
            """
        )
    )
    return ini


def app_alembic(ini: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The application's `alembic -c alembic.ini ...`, run as its team runs it."""
    env = settings_env(Settings(database_url=url))
    env["APP_DATABASE_URL"] = normalize_url(url)  # the app's own choice of driver
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ini), *args],
        env=env,
        cwd=ini.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )


def keyq_migrate(url: str, redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    settings = Settings(
        broker_url=redis_url,
        redis_url=redis_url,
        database_url=url,
        namespace=f"m{uuid.uuid4().hex[:8]}",
    )
    return subprocess.run(
        [sys.executable, "-m", "keyq", "migrate", *args],
        env=settings_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def app_heads(engine: Engine) -> tuple[str, ...]:
    """The application's revisions, read the way its Alembic reads them."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_heads()


def keyq_heads(engine: Engine) -> tuple[str, ...]:
    with engine.connect() as conn:
        return MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE}
        ).get_current_heads()


def app_head(ini: Path) -> str | None:
    from alembic.config import Config

    return ScriptDirectory.from_config(Config(str(ini))).get_current_head()


def stamp_the_old_way(engine: Engine, revision: str) -> None:
    """A deployment of keyq from before its own version table: schema at `revision`, the
    revision recorded in alembic_version."""
    upgrade(engine, revision)
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {VERSION_TABLE}"))
        MigrationContext.configure(conn).stamp(
            ScriptDirectory.from_config(alembic_config(engine)), revision
        )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


# --- an application's Alembic and keyq's in one database ------------------------------------


@pytest.mark.parametrize("order", ["app_first", "keyq_first"])
def test_application_alembic_and_keyq_both_stay_at_head_in_one_database(
    order: str, new_pg_url: Callable[[], str], app_ini: Path, redis_url: str
) -> None:
    url = new_pg_url()
    engine = make_engine(url)
    head = head_revision(engine)
    try:
        steps = {
            "app": lambda: ok(app_alembic(app_ini, url, "upgrade", "head")),
            "keyq": lambda: ok(keyq_migrate(url, redis_url)),
        }
        first, second = ("app", "keyq") if order == "app_first" else ("keyq", "app")

        steps[first]()
        expected = {"app": (app_heads, ("app001",)), "keyq": (keyq_heads, (head,))}
        read_heads, want = expected[first]
        assert read_heads(engine) == want

        steps[second]()
        steps[first]()  # and again: each run finds its own revision and leaves the other's
        steps[second]()

        assert app_heads(engine) == ("app001",) == (app_head(app_ini),)
        assert keyq_heads(engine) == (head,)
        assert "app001" in ok(app_alembic(app_ini, url, "current"))
        assert json.loads(ok(keyq_migrate(url, redis_url, "current")))["revision"] == head
        tables = set(sa.inspect(engine).get_table_names())
        assert {APP_TABLE, LEGACY_VERSION_TABLE, VERSION_TABLE} <= tables
        assert {t.name for t in metadata.sorted_tables} <= tables
    finally:
        engine.dispose()


# --- deployments from before keyq's own version table ---------------------------------------


def test_old_deployment_moves_to_keyq_version_table_and_unblocks_the_app(
    empty_url: str, engine: Engine, app_ini: Path
) -> None:
    head = head_revision(engine)
    stamp_the_old_way(engine, "0002")
    assert app_heads(engine) == ("0002",)
    assert current_revision(engine) == "0002"  # reported from where it still is
    # the clash this fixes: the application's Alembic cannot find keyq's revision
    clash = app_alembic(app_ini, empty_url, "upgrade", "head")
    assert clash.returncode != 0
    assert "Can't locate revision identified by '0002'" in clash.stdout + clash.stderr

    assert upgrade(engine) == head

    assert keyq_heads(engine) == (head,)
    assert LEGACY_VERSION_TABLE not in sa.inspect(engine).get_table_names()  # it was emptied
    ok(app_alembic(app_ini, empty_url, "upgrade", "head"))
    assert app_heads(engine) == ("app001",)
    assert upgrade(engine) == head  # and keyq is not bothered by the application's row
    assert app_heads(engine) == ("app001",)


def test_old_deployment_move_leaves_the_application_rows_and_table(
    empty_url: str, engine: Engine, app_ini: Path
) -> None:
    ok(app_alembic(app_ini, empty_url, "upgrade", "head"))
    with engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {APP_TABLE} (id, item) VALUES (1, 'apple')"))
    upgrade(engine, "0002")  # then keyq's revision recorded the old way, beside the app's
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {VERSION_TABLE}"))
        conn.execute(sa.text(f"INSERT INTO {LEGACY_VERSION_TABLE} VALUES ('0002')"))
    assert set(app_heads(engine)) == {"app001", "0002"}

    upgrade(engine)

    assert keyq_heads(engine) == (head_revision(engine),)
    assert app_heads(engine) == ("app001",)  # the application's row stays, with its table
    with engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT item FROM {APP_TABLE}")).scalars().all() == ["apple"]


def test_alembic_version_is_left_alone_once_keyq_has_its_own_revision(engine: Engine) -> None:
    upgrade(engine)
    with engine.begin() as conn:  # a stray copy of keyq's id, e.g. restored from a backup
        conn.execute(sa.text(f"CREATE TABLE {LEGACY_VERSION_TABLE} (version_num VARCHAR(32))"))
        conn.execute(sa.text(f"INSERT INTO {LEGACY_VERSION_TABLE} VALUES ('0001')"))

    upgrade(engine)

    assert app_heads(engine) == ("0001",)
    assert keyq_heads(engine) == (head_revision(engine),)


# --- the command line -----------------------------------------------------------------------


def test_migrate_sql_prints_the_schema_and_touches_nothing(
    empty_url: str, engine: Engine, redis_url: str
) -> None:
    sql = ok(keyq_migrate(empty_url, redis_url, "--sql"))

    for table in [VERSION_TABLE, *(t.name for t in metadata.sorted_tables)]:
        assert f"CREATE TABLE {table} (" in sql, table
    assert f"INSERT INTO {VERSION_TABLE}" in sql
    assert re.search(rf"\b{LEGACY_VERSION_TABLE}\b", sql) is None  # only keyq's own table
    assert sa.inspect(engine).get_table_names() == []


def test_migrate_sql_from_the_current_revision_is_empty_at_head(
    empty_url: str, engine: Engine, redis_url: str
) -> None:
    upgrade(engine)
    sql = ok(keyq_migrate(empty_url, redis_url, "--sql"))
    assert "CREATE TABLE" not in sql
    assert "-- Running upgrade" not in sql


def test_migrate_sql_of_an_old_deployment_includes_the_move_and_changes_nothing(
    empty_url: str, engine: Engine, redis_url: str
) -> None:
    stamp_the_old_way(engine, "0001")
    before = set(sa.inspect(engine).get_table_names())

    sql = ok(keyq_migrate(empty_url, redis_url, "--sql"))

    assert f"INSERT INTO {VERSION_TABLE} (version_num) VALUES ('0001')" in sql
    assert f"DELETE FROM {LEGACY_VERSION_TABLE}" in sql
    assert f"DROP TABLE {LEGACY_VERSION_TABLE}" in sql
    assert "CREATE TABLE keyq_timer (" in sql  # 0001 -> 0002
    assert "CREATE TABLE keyq_state (" not in sql  # already there
    assert set(sa.inspect(engine).get_table_names()) == before
    assert app_heads(engine) == ("0001",)


def test_migrate_sql_applied_by_a_dba_gives_the_same_schema(
    new_pg_url: Callable[[], str], redis_url: str
) -> None:
    url = new_pg_url()
    sql = ok(keyq_migrate(url, redis_url, "--sql"))
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(sql)
    by_keyq = new_pg_url()
    engine, reference = make_engine(url), make_engine(by_keyq)
    try:
        upgrade(reference)
        assert keyq_heads(engine) == (head_revision(engine),)
        assert schema_of(engine) == schema_of(reference)
    finally:
        engine.dispose()
        reference.dispose()


def schema_of(engine: Engine) -> dict[str, object]:
    """Tables with their columns, keys and indexes, as the database reports them."""
    inspector = sa.inspect(engine)
    return {
        table: (
            [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
            inspector.get_pk_constraint(table)["constrained_columns"],
            sorted((i["name"], tuple(i["column_names"])) for i in inspector.get_indexes(table)),
        )
        for table in sorted(inspector.get_table_names())
    }


def test_migrate_current_prints_null_before_and_head_after_an_upgrade(
    empty_url: str, engine: Engine, redis_url: str
) -> None:
    head = head_revision(engine)
    assert json.loads(ok(keyq_migrate(empty_url, redis_url, "current"))) == {
        "revision": None,
        "head": head,
    }

    migrated = json.loads(ok(keyq_migrate(empty_url, redis_url)))

    assert migrated == {"migrated": True, "revision": head}
    assert json.loads(ok(keyq_migrate(empty_url, redis_url, "current"))) == {
        "revision": head,
        "head": head,
    }


def test_migrate_current_with_the_database_down_is_one_line_and_exit_3(redis_url: str) -> None:
    result = keyq_migrate("postgresql://postgres@127.0.0.1:1/none", redis_url, "current")
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith("error: RepoError:")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# --- the ORM tables and the migrations agree ------------------------------------------------


def schema_differences(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE, "compare_type": True}
        )
        return list(compare_metadata(context, metadata))


def test_migrations_build_exactly_the_tables_the_repo_declares(engine: Engine) -> None:
    upgrade(engine)
    assert schema_differences(engine) == []
