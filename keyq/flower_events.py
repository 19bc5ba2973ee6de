"""Celery task events per keyq message, so Flower shows keyq as it is.

Celery's own events describe broker messages: one ``keyq.dispatch`` task per broker message,
SUCCESS whatever happened inside, while a batch applies many keyq messages (most of them drained
without Celery seeing them). After each commit the worker sends, through Celery's own event
protocol (the ``celeryev`` exchange that Flower reads), for each keyq message:

    task-received, task-started, then task-succeeded, or task-failed for a crash that was
    dead-lettered (``exception`` = the handler's error), for a refusal by the handler
    (``Rejected``) and for a message the apply step refused (malformed, unknown entity or op)

with ``uuid`` = the keyq message id, ``name`` = ``<entity>.<op>`` and ``args`` = ``[key]``, from
the worker's own node name, the events of the batches committed within COALESCE_S (50 ms) in
one broker message (Celery's ``task.multi`` event list). Events cost broker work, so successes
are sampled above ``KEYQ_FLOWER_EVENT_RATE`` messages per second (default 200; 0 turns the
events off): a sampled task says so in its kwargs (``{"sampled": "1 in N"}``). Failures are
always sent.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from keyq import metrics
from keyq.celery_app import make_app
from keyq.errors import ConfigurationError
from keyq.settings import Settings

log = logging.getLogger(__name__)

RATE_VARIABLE = "KEYQ_FLOWER_EVENT_RATE"
DEFAULT_RATE = 200.0  # successful messages per second sent as events before sampling starts
WINDOW_S = 1.0  # the sampling rate is decided per window of this length
MIN_ELAPSED_S = 0.01  # a burst's rate is measured over at least this long
BURST_S = 0.1  # past this share of a second's budget within a window, its rate is measured
BUFFER_LIMIT = 3000  # events per broker message at most (a batch's events, three a message)
COALESCE_S = 0.05  # the sending thread gathers this long's batches into one publish
QUEUE_LIMIT = 1000  # batches of events waiting for the sending thread; past it they are dropped


@dataclass(frozen=True, slots=True)
class MessageEvent:
    """One keyq message's fate in a committed batch."""

    message_id: str
    entity: str
    key: str
    op: str
    status: str  # "applied" | "rejected" | "crashed" | "refused" (by the apply step)
    error: str = ""
    runtime_s: float = 0.0


def rate_from_env(env: dict[str, str] | None = None) -> float:
    raw = (env if env is not None else dict(os.environ)).get(RATE_VARIABLE, "")
    if not raw:
        return DEFAULT_RATE
    try:
        rate = float(raw)
    except ValueError as e:
        raise ConfigurationError(
            f"{RATE_VARIABLE}={raw!r} must be a number of events per second (0: off)"
        ) from e
    if rate < 0:
        raise ConfigurationError(f"{RATE_VARIABLE}={raw!r} must be >= 0 (0: off)")
    return rate


class Sampler:
    """Keeps successes under ``rate`` per second: 1 in N, N chosen from the last window, and
    raised within a window as soon as it has seen more than a tenth of a second's worth at a
    higher rate (a burst shorter than a window, such as a backlog drained in half a second, is
    sampled from its start: each kept task costs the worker about 50 us of Celery's event code)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.every = 1
        self._window_start: float | None = None  # the first keep() opens the first window
        self._seen = 0
        self._counter = 0

    def keep(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self._window_start is None:
            self._window_start = now
        elif now - self._window_start >= WINDOW_S:
            per_s = self._seen / max(now - self._window_start, 1e-9)
            self.every = max(1, math.ceil(per_s / self.rate - 1e-9))
            self._window_start, self._seen = now, 0
        self._seen += 1
        self._counter += 1
        if self._seen > self.rate * BURST_S:  # enough seen to tell a burst's rate
            per_s = (self._seen - 1) / max(now - self._window_start, MIN_ELAPSED_S)
            self.every = max(self.every, math.ceil(per_s / self.rate - 1e-9))
        return self._counter % self.every == 0


class FlowerEvents:
    """Sends the events of committed messages from one worker node."""

    def __init__(self, settings: Settings, node: str, rate: float | None = None) -> None:
        from keyq.celery_worker import celery_hostname  # the name Celery's own events use

        if rate is None:
            try:
                rate = rate_from_env()
            except ConfigurationError as e:  # after a commit nothing may raise: say it once
                log.error("keyq task events are off: %s", e)
                rate = 0.0
        self.rate = rate
        self.hostname = celery_hostname(node)
        self.sampler = Sampler(self.rate or 1.0)
        self._app: Any = None
        self._dispatcher: Any = None
        self._settings = settings
        self._queue: queue.Queue[tuple[list[MessageEvent], dict[str, str], float] | None] = (
            queue.Queue()
        )
        self._thread: threading.Thread | None = None
        self.dropped = 0  # events not sent because the sending thread fell behind

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def _open(self) -> Any:
        if self._dispatcher is None:
            self._app = make_app(self._settings, name="keyq-events", depth_limit=False)
            connection = self._app.connection_for_write()
            self._dispatcher = self._app.events.Dispatcher(
                connection, hostname=self.hostname, groups=["task"],
                buffer_while_offline=False,
                # the events of a period's batches go out as one message (Celery's "task.multi"
                # list, which Flower's receiver reads like single events): one publish per
                # period (see _run), not three per message
                buffer_group=["task"], buffer_limit=BUFFER_LIMIT,
            )
        return self._dispatcher

    def sample(self) -> bool:
        """Whether the next success goes out as a task (the sampler; always, when off)."""
        return self.sampler.keep() if self.enabled else False

    def emit(self, events: Iterable[MessageEvent]) -> int:
        """Hand the events, already sampled (``events_of(outcome, keep=self.sample)``), to the
        sending thread; returns how many tasks go out. The worker calls this after a batch's
        replies: the broker publish (about 0.3 ms) runs beside the next batch, not before it."""
        if not self.enabled:
            return 0
        chosen = list(events)
        if not chosen:
            return 0
        kwargs = {"sampled": f"1 in {self.sampler.every}"} if self.sampler.every > 1 else {}
        if self._queue.qsize() >= QUEUE_LIMIT:  # the broker is slow or gone: best effort
            self.dropped += len(chosen)
            metrics.task_events_dropped.inc(len(chosen))
            return 0
        self._start()
        self._queue.put((chosen, kwargs, time.time()))
        return len(chosen)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every handed-over event is sent (or given up); True when done."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="keyq-task-events", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        """Send what the batches handed over, COALESCE_S of them at a time: one wake-up and
        one broker publish per period, not per batch (at 1,000 msg/s a worker commits some
        500 batches a second, and waking this thread for each cost it about a tenth of its
        CPU)."""
        while True:
            items = [self._queue.get()]
            if items[0] is not None:
                time.sleep(COALESCE_S)  # the next batches' events join this publish
                while True:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
            batches = [i for i in items if i is not None]
            try:
                if batches:
                    self._send(batches)
            except Exception as e:  # events are best effort: a broker error loses them
                log.warning("keyq could not send task events node=%s error=%s", self.hostname, e)
            finally:
                for _ in items:
                    self._queue.task_done()
            if len(batches) < len(items):  # close() asked the thread to end
                return

    def _send(self, batches: list[tuple[list[MessageEvent], dict[str, str], float]]) -> None:
        dispatcher = self._open()
        for chosen, kwargs, now in batches:
            self._buffer(dispatcher, chosen, kwargs, now)
        dispatcher.flush()

    def _buffer(
        self, dispatcher: Any, chosen: list[MessageEvent], kwargs: dict[str, str], now: float
    ) -> None:
        for e in chosen:
            dispatcher.send(
                "task-received", uuid=e.message_id, name=f"{e.entity}.{e.op}",
                args=repr([e.key]), kwargs=repr(kwargs if e.status == "applied" else {}),
                retries=0, eta=None, root_id=e.message_id, parent_id=None,
                timestamp=now - e.runtime_s,
            )
            dispatcher.send("task-started", uuid=e.message_id, timestamp=now - e.runtime_s)
            if e.status == "applied":
                dispatcher.send(
                    "task-succeeded", uuid=e.message_id, result="applied",
                    runtime=e.runtime_s, timestamp=now,
                )
            else:
                dispatcher.send(
                    "task-failed", uuid=e.message_id, exception=e.error or e.status,
                    traceback="", timestamp=now,
                )

    def close(self) -> None:
        if self._thread is not None:
            self.flush()
            self._queue.put(None)
            self._thread.join(timeout=5.0)
            self._thread = None
        if self._dispatcher is not None:
            self._dispatcher.close()
            self._dispatcher = None
        if self._app is not None:
            self._app.close()
            self._app = None


REFUSALS = frozenset({"malformed", "unknown"})  # dead-letter reasons of the apply step's refusals
# the task name (entity.op) of a refused message that does not say its entity and op
REFUSED_ENTITY, REFUSED_OP = "keyq", "refused"


def events_of(outcome: Any, keep: Callable[[], bool] | None = None) -> list[MessageEvent]:
    """A committed batch's message events. Uses the applier's per-message record when it keeps
    one (``outcome.messages``: (envelope, status, error) rows); otherwise only the dead letters
    of the batch are known one by one, and only they are sent (as failures). ``keep``: the
    sampler's say on each success (FlowerEvents.sample), asked before its event is built.

    Messages the apply step refused (malformed, or naming an unknown entity or operation) never
    reach a handler, so they are not in ``outcome.messages``: their dead letters are sent as
    failures too, named ``<entity>.<op>`` when the message says so, else ``keyq.refused``, and
    under a made-up id when they carry none (Flower files tasks by id)."""
    rows: Sequence[Any] | None = getattr(outcome, "messages", None)
    if rows is None:
        return [
            MessageEvent(
                dl.message_id, dl.entity, dl.key, dl.op, "crashed",
                f"{dl.error_type}: {dl.error_message}",
            )
            for dl in outcome.dead_letters
            if dl.message_id
        ]
    out = [MessageEvent(env.id, env.entity, env.key, env.op, status, error)
           for env, status, error in rows
           if keep is None or status != "applied" or keep()]  # sampled out: never built
    known = {e.message_id for e in out}
    for dl in outcome.dead_letters:
        if dl.reason not in REFUSALS or (dl.message_id and dl.message_id in known):
            continue
        named = bool(dl.entity and dl.op)
        out.append(
            MessageEvent(
                dl.message_id or f"keyq-refused-{uuid.uuid4().hex}",
                dl.entity if named else REFUSED_ENTITY,
                dl.key,
                dl.op if named else REFUSED_OP,
                "refused",
                f"{dl.error_type}: {dl.error_message} (dead letter: {dl.reason})",
            )
        )
    return out
