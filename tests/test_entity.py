"""Entity definitions fail at class creation with a hint; only @handler methods are invocable."""

from __future__ import annotations

import math
from typing import Any

import pytest

from keyq.entity import Entity, EntityRegistry, RestartPolicy, handler
from keyq.errors import (
    EntityDefinitionError,
    UnknownEntityError,
    UnknownOperationError,
)

Result = tuple[Any, Any]


def test_entity_without_name_is_refused_with_hint() -> None:
    with pytest.raises(EntityDefinitionError, match=r'needs a class attribute `name = "\.\.\."`'):

        class NoName(Entity):
            @handler
            def go(self, state: Any, payload: Any) -> Result:
                return state, None


@pytest.mark.parametrize("bad", ["Cart", "with space", "1abc", "", "x" * 65, "é", 5])
def test_entity_with_bad_name_is_refused_naming_the_pattern(bad: object) -> None:
    with pytest.raises(EntityDefinitionError, match=r"entity name .* must match \^\[a-z\]"):

        class BadName(Entity):
            name = bad  # type: ignore[assignment]

            @handler
            def go(self, state: Any, payload: Any) -> Result:
                return state, None


def test_entity_without_handlers_is_refused_with_hint() -> None:
    with pytest.raises(EntityDefinitionError, match="has no handlers: decorate methods with"):

        class Empty(Entity):
            name = "test-empty"

            def go(self, state: Any, payload: Any) -> Result:  # not decorated
                return state, None


def test_duplicate_operation_is_refused_naming_both_methods() -> None:
    with pytest.raises(
        EntityDefinitionError, match=r"declares handler 'add' twice \(add_a and add_b\)"
    ):

        class Twice(Entity):
            name = "test-twice"

            @handler("add")
            def add_a(self, state: Any, payload: Any) -> Result:
                return state, None

            @handler("add")
            def add_b(self, state: Any, payload: Any) -> Result:
                return state, None


@pytest.mark.parametrize("arity", [1, 2, 4])
def test_handler_with_wrong_arity_is_refused(arity: int) -> None:
    params = ", ".join(["self", "state", "payload", "extra"][:arity])
    namespace: dict[str, Any] = {}
    exec(f"def go({params}):\n    return None, None\n", namespace)
    with pytest.raises(EntityDefinitionError, match=r"must take \(self, state, payload\)"):
        type(Entity)("Arity", (Entity,), {"name": "test-arity", "go": handler(namespace["go"])})


@pytest.mark.parametrize("initial", [{1, 2}, {"x": math.nan}, object(), b"bytes"])
def test_initial_state_that_is_not_json_is_refused(initial: object) -> None:
    with pytest.raises(
        EntityDefinitionError, match="initial_state of entity 'test-initial' is not JSON"
    ):

        class BadInitial(Entity):
            name = "test-initial"
            initial_state = initial

            @handler
            def go(self, state: Any, payload: Any) -> Result:
                return state, None


@pytest.mark.parametrize("op", ["Bad", "with space", "9lives", "x" * 65, ""])
def test_handler_with_bad_operation_name_is_refused(op: str) -> None:
    with pytest.raises(EntityDefinitionError, match=r"handler name .* must match"):

        @handler(op)
        def go(self: Any, state: Any, payload: Any) -> Result:
            return state, None


class Toggle(Entity):
    """An entity with helpers that must never be reachable from a message."""

    name = "test-toggle"
    initial_state = {"on": False, "log": []}

    @handler
    def flip(self, state: dict[str, Any], payload: Any) -> Result:
        return {**state, "on": not state["on"]}, not state["on"]

    @handler("set-on")
    def set_on(self, state: dict[str, Any], payload: Any) -> Result:
        return {**state, "on": True}, True

    def reset(self, state: dict[str, Any], payload: Any) -> Result:  # public, not a handler
        return {"on": False, "log": []}, None

    def _secret(self, state: dict[str, Any], payload: Any) -> Result:
        return state, "secret"


def test_only_decorated_methods_are_operations() -> None:
    assert Toggle.handlers == {"flip": "flip", "set-on": "set_on"}
    toggle = EntityRegistry([Toggle]).get("test-toggle")
    assert toggle.handler_for("set-on")({"on": False, "log": []}, None) == (
        {"on": True, "log": []},
        True,
    )
    for op in ("reset", "_secret", "set_on", "initial", "on_activate", "on_passivate", "__init__"):
        with pytest.raises(UnknownOperationError, match=r"known: flip, set-on"):
            toggle.handler_for(op)


def test_initial_state_is_a_fresh_copy_each_time() -> None:
    toggle = EntityRegistry([Toggle]).get("test-toggle").instance
    first = toggle.initial()
    first["log"].append("mutated")
    assert toggle.initial() == {"on": False, "log": []}
    assert Toggle.initial_state == {"on": False, "log": []}


def test_restart_policy_uses_entity_override_else_default() -> None:
    default = RestartPolicy(3, 5.0)
    assert Toggle().restart_policy(default) == default

    class Strict(Toggle):
        name = "test-strict"
        max_restarts = 0

    assert Strict().restart_policy(default) == RestartPolicy(0, 5.0)


def test_registry_from_modules_on_missing_module_is_a_definition_error() -> None:
    with pytest.raises(
        EntityDefinitionError,
        match=r"cannot import entity module 'no_such_mod_xyz' \(KEYQ_ENTITY_MODULES\)",
    ):
        EntityRegistry.from_modules(["keyq.examples", "no_such_mod_xyz"])


def test_registry_from_modules_selects_only_those_modules() -> None:
    tests_only = set(EntityRegistry.from_modules(["tests.entities"]).names())
    examples = set(EntityRegistry.from_modules(["keyq.examples"]).names())
    assert {"flaky", "sequence", "witness"} <= tests_only
    assert {"cart", "counter", "journal"} <= examples
    assert not tests_only & examples
    assert "test-toggle" not in tests_only | examples  # declared here, in neither module
    both = EntityRegistry.from_modules(["keyq.examples", "tests.entities"])
    assert set(both.names()) == examples | tests_only


def test_registry_unknown_entity_names_the_registered_ones() -> None:
    with pytest.raises(
        UnknownEntityError,
        match=r"unknown entity 'nope'; registered: test-toggle \(see KEYQ_ENTITY_MODULES\)",
    ):
        EntityRegistry([Toggle]).get("nope")
    with pytest.raises(UnknownEntityError, match=r"registered: none"):
        EntityRegistry([]).get("nope")


def test_registry_refuses_two_classes_with_one_name() -> None:
    class Other(Entity):
        name = "test-toggle"

        @handler
        def flip(self, state: Any, payload: Any) -> Result:
            return state, None

    with pytest.raises(EntityDefinitionError, match="entity name 'test-toggle' is declared twice"):
        EntityRegistry([Toggle, Other])
    assert EntityRegistry([Toggle, Toggle]).names() == ["test-toggle"]


@pytest.mark.parametrize("op", ["keyq.activate", "keyq.anything"])
def test_handler_names_reserved_for_system_messages_are_refused(op: str) -> None:
    with pytest.raises(EntityDefinitionError, match=r"reserved for keyq's system messages"):

        @handler(op)
        def go(self: Any, state: Any, payload: Any) -> Result:
            return state, None
