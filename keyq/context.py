"""The handler context: what a running handler may ask of keyq besides returning a new state.

Inside a handler, ``keyq.context.current()`` gives the message's key, id and clock, the timer
that fired it (if any), and ``schedule`` / ``cancel`` of the key's timers. Timer changes take
effect only if the handler returns: they are committed in the same transaction as the state,
and a handler that raises leaves no timer change behind.
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from contextvars import ContextVar, Token
from dataclasses import dataclass, field

from keyq.entity import JSON, EntityType
from keyq.envelope import check_payload
from keyq.errors import NoHandlerContextError, ValidationError
from keyq.records import TimerChange, TimerDelete, TimerRow

CATCH_UP_POLICIES = ("coalesce", "skip", "each")
MIN_EVERY_S = 0.05  # a periodic timer fires at most 20 times a second
_TIMER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")

_current: ContextVar[HandlerContext | None] = ContextVar("keyq_handler_context", default=None)


@dataclass(frozen=True, slots=True)
class TimerFire:
    """The timer whose fire is being handled: its name, due time and periods missed."""

    name: str
    due: float  # epoch seconds the fire was due at
    missed: int  # whole periods missed before this fire (coalesce/each catch-up), else 0


@dataclass
class HandlerContext:
    """The context of one handler run for one message of one key."""

    entity_type: EntityType
    key: str
    message_id: str
    partition: int
    now: float  # epoch seconds at which the batch is applied, on the database's clock
    max_payload_bytes: int
    timer: TimerFire | None = None
    changes: list[TimerChange] = field(default_factory=list)

    @property
    def entity(self) -> str:
        return self.entity_type.name

    def schedule(
        self,
        delay_s: float,
        op: str,
        payload: JSON = None,
        name: str = "default",
        catch_up: str = "coalesce",
        every_s: float | None = None,
        jitter: float = 0.0,
    ) -> None:
        """Send `op` with `payload` to this key after delay_s (then every every_s, if given).

        One timer per name: scheduling a name again replaces its pending timer. catch_up says
        what a periodic timer does when periods were missed while its partition was down or
        backed up: "coalesce" fires once for all of them, "skip" drops them and waits for the
        next period, "each" fires once per missed period. A one-shot timer always fires.

        jitter (a fraction of every_s, 0 to 1; default 0: exactly on the period) delays a
        periodic timer's first fire by a fixed part of jitter * every_s, and so all its fires:
        keys that arm the same period at once do not fire in lockstep, and each key still
        fires every every_s. The part comes from a hash of (entity, key, name), so arming the
        same timer again keeps it.
        """
        if not isinstance(delay_s, int | float) or not math.isfinite(delay_s) or delay_s < 0:
            raise ValidationError(f"timer delay_s must be a finite number >= 0, got {delay_s!r}")
        if every_s is not None and (
            not isinstance(every_s, int | float)
            or not math.isfinite(every_s)
            or every_s < MIN_EVERY_S
        ):
            raise ValidationError(f"timer every_s must be None or >= {MIN_EVERY_S}: {every_s!r}")
        if (
            not isinstance(jitter, int | float)
            or not math.isfinite(jitter)
            or not 0 <= jitter <= 1
        ):
            raise ValidationError(f"timer jitter must be a fraction from 0 to 1, got {jitter!r}")
        if jitter and every_s is None:
            raise ValidationError("timer jitter spreads periodic timers: it needs every_s")
        if catch_up not in CATCH_UP_POLICIES:
            raise ValidationError(f"catch_up must be one of {CATCH_UP_POLICIES}, got {catch_up!r}")
        _check_name(name)
        self.entity_type.handler_for(op)
        check_payload(payload, self.max_payload_bytes)
        every_ms = None if every_s is None else round(every_s * 1000)
        spread = 0 if every_ms is None else jitter_ms(self.entity, self.key, name, every_ms, jitter)
        self.changes.append(
            TimerRow(
                entity=self.entity,
                key=self.key,
                name=name,
                timer_id=uuid.uuid4().hex,
                partition=self.partition,
                due_ms=round((self.now + delay_s) * 1000) + spread,
                op=op,
                payload=payload,
                every_ms=every_ms,
                catch_up=catch_up,
            )
        )

    def cancel(self, name: str = "default") -> None:
        """Drop this key's pending timer of that name (nothing happens if there is none)."""
        _check_name(name)
        self.changes.append(TimerDelete(self.entity, self.key, name))


def jitter_ms(entity: str, key: str, name: str, every_ms: int, jitter: float) -> int:
    """A periodic timer's fixed delay in [0, jitter * every_ms]: the same for the same
    (entity, key, name), spread evenly over keys (a hash, not a random draw)."""
    ident = f"{entity}\0{key}\0{name}".encode("utf-8", "surrogatepass")
    unit = int.from_bytes(hashlib.blake2b(ident, digest_size=8).digest(), "big") / 2**64
    return math.floor(unit * jitter * every_ms)


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not _TIMER_NAME_RE.match(name):
        raise ValidationError(f"timer name {name!r} must match {_TIMER_NAME_RE.pattern}")


def current() -> HandlerContext:
    """The context of the handler running now; NoHandlerContextError outside a handler."""
    ctx = _current.get()
    if ctx is None:
        raise NoHandlerContextError(
            "keyq.context.current() is only available while a keyq handler runs"
        )
    return ctx


def current_or_none() -> HandlerContext | None:
    """The running handler's context, or None (for code that also runs outside handlers)."""
    return _current.get()


class running:
    """Make ctx the current context while a handler runs (the applier's side). A class, not a
    generator: it is entered once per applied message."""

    __slots__ = ("ctx", "token")

    def __init__(self, ctx: HandlerContext) -> None:
        self.ctx = ctx
        self.token: Token[HandlerContext | None] | None = None

    def __enter__(self) -> HandlerContext:
        self.token = _current.set(self.ctx)
        return self.ctx

    def __exit__(self, *_exc: object) -> None:
        if self.token is not None:
            _current.reset(self.token)
