"""The CLI's error edge: every failure of a `keyq` command ends as one line and a named code.

keyq's own modules convert redis-py, kombu and SQLAlchemy errors into the KeyqError families
where they arise; this module is the net under them. It turns a KeyqError, a library error that
slipped through, any other exception, and click's own usage errors into a single line on stderr
that names the problem (and the server that was down, with its password redacted), then exits
with the code the README documents. ``KEYQ_DEBUG=1`` adds the traceback above that line.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import click

from keyq.errors import (
    BrokerUnavailableError,
    CacheUnavailableError,
    CallTimeoutError,
    ConfigurationError,
    HandlerError,
    KeyqError,
    RepoError,
    StaleWriteError,
    ValidationError,
)
from keyq.settings import DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL, redact_url

EXIT_OK = 0
EXIT_FAILED = 1  # the operation ran and failed: handler refused or crashed, timeout
EXIT_USAGE = 2  # bad input or configuration
EXIT_UNAVAILABLE = 3  # broker, Redis or database not reachable

DEBUG_VARIABLE = "KEYQ_DEBUG"  # set to 1: print the traceback above the one-line error
# lines of SQLAlchemy's error text that only repeat the statement or point at its docs
_NOISE_PREFIXES = ("[SQL:", "[parameters:", "(Background on this error")
# what SQLite and PostgreSQL say when keyq's tables were never created
_NO_SCHEMA = ("no such table", 'relation "keyq_')
F = TypeVar("F", bound=Callable[..., Any])


def exit_code(e: KeyqError) -> int:
    """The documented exit code of a keyq error."""
    if isinstance(e, ValidationError | ConfigurationError):
        return EXIT_USAGE
    if isinstance(e, StaleWriteError):
        return EXIT_FAILED
    if isinstance(e, BrokerUnavailableError | CacheUnavailableError | RepoError):
        return EXIT_UNAVAILABLE
    if isinstance(e, HandlerError | CallTimeoutError):
        return EXIT_FAILED
    return EXIT_FAILED


def _env_url(variable: str, default: str) -> str:
    return os.environ.get(variable) or default


def _redis_url() -> str:
    return _env_url("KEYQ_REDIS_URL", DEFAULT_REDIS_URL)


def _broker_url() -> str:
    return os.environ.get("KEYQ_BROKER_URL") or _redis_url()


def _database_url() -> str:
    return _env_url("KEYQ_DATABASE_URL", DEFAULT_DATABASE_URL)


def one_line(text: str) -> str:
    """The message on one line, without SQLAlchemy's statement and documentation lines, and
    without the client object redis-py's Sentinel errors print ("No master found for 'm' :
    <redis.client.Redis(<...ConnectionPool(...)>)>")."""
    cut = [i for i in (text.find("\n" + m) for m in _NOISE_PREFIXES) if i >= 0]
    if cut:
        text = text[: min(cut)]
    text = _CLIENT_REPR.sub("", text)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


_CLIENT_REPR = re.compile(r" : <redis\.[A-Za-z.]+\(.*\)>")


def scrub(text: str) -> str:
    """Replace the password of every configured URL wherever it shows in text."""
    for url in (_redis_url(), _broker_url(), _database_url()):
        text = text.replace(url, redact_url(url))
        try:
            password = urlsplit(url).password
        except ValueError:
            continue
        if password:
            text = text.replace(f":{password}@", ":***@")
            if len(password) >= 4:  # a short one would also hit ordinary words
                text = text.replace(password, "***")
    return text


def _at(what: str, url: str, message: str) -> str:
    """The message, saying which server (`what at url`) unless it already does."""
    where = redact_url(url)
    if where in message or f"{what} at " in message:
        return message
    if message.startswith(f"{what} "):
        return f"{what} at {where} {message[len(what) + 1 :]}"
    return f"{what} at {where}: {message}"


def _name_the_server(e: KeyqError, message: str) -> str:
    """Make an infrastructure error say which server it was about."""
    if isinstance(e, BrokerUnavailableError):
        return _at("broker", _broker_url(), message)
    if isinstance(e, CacheUnavailableError):
        return _at("Redis", _redis_url(), message)
    if isinstance(e, RepoError) and not isinstance(e, StaleWriteError):
        return _at("database", _database_url(), message)
    return message


def as_keyq_error(e: BaseException) -> KeyqError | None:
    """A library error that reached the edge, converted to the keyq family it belongs to."""
    if isinstance(e, KeyqError):
        return e
    import kombu.exceptions
    import redis
    import sqlalchemy.exc

    if isinstance(e, redis.RedisError):
        return CacheUnavailableError(
            f"Redis at {redact_url(_redis_url())} is not answering: {one_line(str(e))}"
        )
    if isinstance(e, kombu.exceptions.OperationalError):
        return BrokerUnavailableError(
            f"broker at {redact_url(_broker_url())} is not answering: {one_line(str(e))}"
        )
    if isinstance(e, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
        return RepoError(
            f"database at {redact_url(_database_url())} is not answering: {one_line(str(e))}"
        )
    if isinstance(e, sqlalchemy.exc.SQLAlchemyError):
        return RepoError(f"database at {redact_url(_database_url())}: {one_line(str(e))}")
    if isinstance(e, ConnectionError | TimeoutError):
        return BrokerUnavailableError(
            f"a connection failed (Redis at {redact_url(_redis_url())}, database at "
            f"{redact_url(_database_url())}): {type(e).__name__}: {one_line(str(e))}"
        )
    return None


def describe(e: BaseException) -> tuple[str, int]:
    """The one line to print for an exception, and the exit code."""
    if isinstance(e, click.ClickException):
        message = one_line(e.format_message()).rstrip(".")
        ctx = getattr(e, "ctx", None)
        if isinstance(e, click.UsageError) and ctx is not None:
            message = f"{message} (see {ctx.command_path} --help)"
        return scrub(f"error: {message}"), e.exit_code
    if isinstance(e, click.Abort):
        return "error: aborted", EXIT_FAILED
    converted = as_keyq_error(e)
    if converted is None:
        hint = f"(set {DEBUG_VARIABLE}=1 for the traceback)"
        line = f"error: internal: {type(e).__name__}: {one_line(str(e))} {hint}"
        return scrub(line), EXIT_FAILED
    message = _name_the_server(converted, one_line(str(converted)))
    if isinstance(converted, RepoError) and any(m in message for m in _NO_SCHEMA):
        message += " (run `keyq migrate` first)"
    return scrub(f"error: {type(converted).__name__}: {message}"), exit_code(converted)


def fail(e: BaseException) -> NoReturn:
    """Print the one line for e (the traceback too under KEYQ_DEBUG=1) and exit."""
    line, code = describe(e)
    if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
        traceback.print_exception(e)
    click.echo(line, err=True)
    sys.exit(code)


def handle_errors(fn: F) -> F:
    """Turn any error of a command into one clear line on stderr and a named exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.Abort):
            raise  # the group reports these, with the command's usage hint
        except Exception as e:
            fail(e)

    return wrapper  # type: ignore[return-value]


class KeyqGroup(click.Group):
    """The top-level group: click's usage errors and anything a command let through end as
    one line too, not as a usage block or a traceback."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # a bare `keyq` (click >= 8.2): help
                e.show()
                sys.exit(e.exit_code)
            fail(e)
        except Exception as e:
            fail(e)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)
