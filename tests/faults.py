"""Fault injection for worker subprocesses, from outside the product's code.

A test lists this module in the worker's KEYQ_ENTITY_MODULES and sets KEYQ_TEST_FAULTS; on import
it wraps the named methods so that the worker fails exactly where the test wants:

- ``exit-after-commit=N``: the process exits hard (os._exit) after its Nth committed batch that
  applied something, before anything else of that batch (cache, replies, in-flight, ack).
- ``Class.method=N`` (Class in Mailbox, Repo, StateCache, Applier, WorkerRuntime, NameRegistry):
  the Nth call of that method raises RuntimeError("injected fault ..."), once.
- ``Class.method=N:exit``: the Nth call exits the process hard instead.
- ``refuse-state=TEXT``: the database "refuses" any commit writing a state whose JSON holds
  TEXT (Repo.commit raises RepoDataError, as for a constraint or encoding error).
- ``follow-reply-lost=N``: the Nth post-commit round trip that took a next batch into the
  in-flight lists (Mailbox.drain_ready's reply names messages) raises while its reply is read,
  as if the connection died after Redis had run it: the worker never sees those messages.
- ``follow-then-fail=N``: the Nth batch whose post-commit round trip took a next batch raises
  right after it (in WorkerRuntime._count): that next batch sits in the in-flight lists, read
  but never applied. From then on the worker takes no follow-on batch (as when a stream turns
  sparse), so no later follow-on drain can pick those in-flight lists up by chance.

Several faults are separated by commas.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from keyq.applier import Applier, BatchOutcome
from keyq.cache import StateCache
from keyq.errors import RepoDataError
from keyq.mailbox import Mailbox
from keyq.registry import NameRegistry
from keyq.repo import Repo
from keyq.worker import WorkerRuntime

FAULTS_ENV = "KEYQ_TEST_FAULTS"
MODULE = __name__
_CLASSES: dict[str, type] = {
    c.__name__: c for c in (Mailbox, Repo, StateCache, Applier, WorkerRuntime, NameRegistry)
}


def _exit_after_commit(n: int) -> None:
    original = WorkerRuntime._after_commit
    left = {"n": n}

    def after_commit(self: WorkerRuntime, outcome: BatchOutcome, *args: Any, **kw: Any) -> Any:
        if outcome.applied:
            left["n"] -= 1
            if left["n"] == 0:
                os._exit(137)
        return original(self, outcome, *args, **kw)

    WorkerRuntime._after_commit = after_commit  # type: ignore[method-assign]


def _fail_on_call(cls: type, name: str, n: int, how: str) -> None:
    original = getattr(cls, name)
    calls = {"n": 0}

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            if how == "exit":
                os._exit(137)
            raise RuntimeError(f"injected fault in {cls.__name__}.{name} (call {n})")
        return original(*args, **kwargs)

    setattr(cls, name, wrapper)


def _refuse_state(text: str) -> None:
    original = Repo.commit

    def commit(self: Repo, partition: int, fence: int, writes: Any, *args: Any, **kw: Any) -> Any:
        everything = [*writes, *(w for _, _, ws in kw.get("others", ()) for w in ws)]
        if any(text in json.dumps(w.state) for w in everything):
            raise RepoDataError(f"injected: the database refuses a state holding {text!r}")
        return original(self, partition, fence, writes, *args, **kw)

    Repo.commit = commit  # type: ignore[method-assign]


def _lose_follow_reply(n: int) -> None:
    original = Mailbox.drain_ready
    seen = {"n": 0}

    def drain_ready(self: Mailbox, *args: Any, **kwargs: Any) -> Any:
        read = original(self, *args, **kwargs)

        def lossy(reply: object) -> Any:
            got = read(reply)
            if any(got.values()):
                seen["n"] += 1
                if seen["n"] == n:
                    raise RuntimeError(f"injected fault: follow-on reply {n} lost")
            return got

        return lossy

    Mailbox.drain_ready = drain_ready  # type: ignore[method-assign]


def _fail_after_follow(n: int) -> None:
    original_ready, original_count = Mailbox.drain_ready, WorkerRuntime._count
    original_follow_on = WorkerRuntime._follow_on
    state = {"took": False, "n": 0}

    def drain_ready(self: Mailbox, *args: Any, **kwargs: Any) -> Any:
        read = original_ready(self, *args, **kwargs)

        def noting(reply: object) -> Any:
            got = read(reply)
            state["took"] = any(got.values())
            return got

        return noting

    def count(self: WorkerRuntime, outcome: BatchOutcome) -> None:
        took, state["took"] = state["took"], False
        if took:
            state["n"] += 1
            if state["n"] == n:
                raise RuntimeError(f"injected fault: batch {n} that followed on failed after")
        original_count(self, outcome)

    def follow_on(self: WorkerRuntime, *args: Any) -> Any:
        return None if state["n"] >= n else original_follow_on(self, *args)

    Mailbox.drain_ready = drain_ready  # type: ignore[method-assign]
    WorkerRuntime._count = count  # type: ignore[method-assign]
    WorkerRuntime._follow_on = follow_on  # type: ignore[method-assign]


def install(spec: str) -> None:
    for item in filter(None, (part.strip() for part in spec.split(","))):
        target, _, count = item.partition("=")
        n, _, how = count.partition(":")
        if target == "exit-after-commit":
            _exit_after_commit(int(n))
            continue
        if target == "refuse-state":
            _refuse_state(count)
            continue
        if target == "follow-reply-lost":
            _lose_follow_reply(int(count))
            continue
        if target == "follow-then-fail":
            _fail_after_follow(int(count))
            continue
        cls_name, _, method = target.partition(".")
        _fail_on_call(_CLASSES[cls_name], method, int(n), how)


install(os.environ.get(FAULTS_ENV, ""))
