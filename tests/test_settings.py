"""Settings: read once from KEYQ_* variables; malformed or contradictory values are refused
with a message naming the variable; secrets never reach a log line."""

from __future__ import annotations

import dataclasses
import json

import pytest

from keyq import settings as defaults
from keyq.errors import ConfigurationError
from keyq.settings import ENV_VARIABLES, Settings, redact_url


def test_empty_environment_gives_the_documented_defaults() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert s.redis_url == defaults.DEFAULT_REDIS_URL
    assert s.broker_url == s.redis_url  # the broker defaults to the registry's Redis
    assert s.database_url == defaults.DEFAULT_DATABASE_URL
    assert s.namespace == "keyq"
    assert s.partitions == defaults.DEFAULT_PARTITIONS
    assert s.entity_modules == ("keyq.examples",)
    assert s.lease_ttl_ms == defaults.DEFAULT_LEASE_TTL_MS
    assert s.max_payload_bytes == defaults.DEFAULT_MAX_PAYLOAD_BYTES
    assert s.max_key_length == 256
    assert s.dedupe_window >= s.batch_max
    assert s.metrics_port == 0


def test_empty_strings_count_as_unset() -> None:
    assert Settings.from_env({"KEYQ_PARTITIONS": "", "KEYQ_REDIS_URL": ""}) == Settings()


# variable -> (raw value, Settings field, parsed value)
EVERY_VARIABLE = {
    "KEYQ_REDIS_URL": ("redis://cache:6380/2", "redis_url", "redis://cache:6380/2"),
    "KEYQ_BROKER_URL": ("rediss://broker:6379/1", "broker_url", "rediss://broker:6379/1"),
    "KEYQ_DATABASE_URL": ("postgresql://u@db/keyq", "database_url", "postgresql://u@db/keyq"),
    "KEYQ_NAMESPACE": ("shop-eu_1", "namespace", "shop-eu_1"),
    "KEYQ_PARTITIONS": ("128", "partitions", 128),
    "KEYQ_ENTITY_MODULES": (" a.b , c ,,", "entity_modules", ("a.b", "c")),
    "KEYQ_LEASE_TTL_MS": ("2500", "lease_ttl_ms", 2500),
    "KEYQ_IDLE_TIMEOUT_S": ("1.5", "idle_timeout_s", 1.5),
    "KEYQ_MAX_ACTIVATIONS": ("77", "max_activations", 77),
    "KEYQ_MAX_PAYLOAD_BYTES": ("1024", "max_payload_bytes", 1024),
    "KEYQ_MAX_KEY_LENGTH": ("64", "max_key_length", 64),
    "KEYQ_CACHE_TTL_S": ("60", "cache_ttl_s", 60.0),
    "KEYQ_CACHE_MAX_KEYS": ("500", "cache_max_keys", 500),
    "KEYQ_DEDUPE_WINDOW": ("1000", "dedupe_window", 1000),
    "KEYQ_BATCH_MAX": ("32", "batch_max", 32),
    "KEYQ_MAX_RESTARTS": ("0", "max_restarts", 0),
    "KEYQ_RESTART_WINDOW_S": ("9.5", "restart_window_s", 9.5),
    "KEYQ_RECONCILE_INTERVAL_S": ("3", "reconcile_interval_s", 3.0),
    "KEYQ_RECONCILE_BATCH": ("50", "reconcile_batch", 50),
    "KEYQ_RECONCILE_BUDGET_S": ("0.5", "reconcile_budget_s", 0.5),
    "KEYQ_CALL_TIMEOUT_S": ("2.5", "call_timeout_s", 2.5),
    "KEYQ_METRICS_PORT": ("9108", "metrics_port", 9108),
    "KEYQ_FOLLOW_ON": ("off", "follow_on", False),
    "KEYQ_FETCH_CLAIM": ("0", "fetch_claim", False),
    "KEYQ_REPLY_SPIN_US": ("0", "reply_spin_us", 0),
}


@pytest.mark.parametrize("variable", sorted(EVERY_VARIABLE))
def test_each_variable_is_parsed_into_its_field(variable: str) -> None:
    raw, field_name, expected = EVERY_VARIABLE[variable]
    s = Settings.from_env({variable: raw})
    assert getattr(s, field_name) == expected
    changed = {
        f.name
        for f in dataclasses.fields(Settings)
        if getattr(s, f.name) != getattr(Settings(), f.name)
    }
    # one variable changes its own field only (KEYQ_REDIS_URL also feeds the broker default)
    assert changed - {"broker_url"} == {field_name} - {"broker_url"}


def test_all_variables_together() -> None:
    s = Settings.from_env({name: raw for name, (raw, _, _) in EVERY_VARIABLE.items()})
    for raw, field_name, expected in EVERY_VARIABLE.values():
        assert getattr(s, field_name) == expected, (field_name, raw)


BAD_VALUES = [
    ("KEYQ_PARTITIONS", "eight", "is not an integer"),
    ("KEYQ_PARTITIONS", "0", "must be at least 1"),
    ("KEYQ_PARTITIONS", "4097", "at most 4096"),
    ("KEYQ_PARTITIONS", "1.5", "is not an integer"),
    ("KEYQ_LEASE_TTL_MS", "99", "must be at least 100"),
    ("KEYQ_IDLE_TIMEOUT_S", "soon", "is not a number"),
    ("KEYQ_IDLE_TIMEOUT_S", "0", "must be at least 0.01"),
    ("KEYQ_IDLE_TIMEOUT_S", "nan", "must be a finite number"),
    ("KEYQ_CALL_TIMEOUT_S", "NaN", "must be a finite number"),
    ("KEYQ_CACHE_TTL_S", "inf", "must be a finite number"),
    ("KEYQ_MAX_ACTIVATIONS", "-5", "must be at least 1"),
    ("KEYQ_MAX_PAYLOAD_BYTES", "64k", "is not an integer"),
    ("KEYQ_MAX_KEY_LENGTH", "0", "must be at least 1"),
    ("KEYQ_MAX_KEY_LENGTH", "1025", "the Repo stores keys of at most 1024 characters"),
    ("KEYQ_CACHE_TTL_S", "0.5", "must be at least 1.0"),
    ("KEYQ_CACHE_MAX_KEYS", "x", "is not an integer"),
    ("KEYQ_DEDUPE_WINDOW", "0", "must be at least 1"),
    ("KEYQ_BATCH_MAX", "many", "is not an integer"),
    ("KEYQ_MAX_RESTARTS", "-1", "must be at least 0"),
    ("KEYQ_RESTART_WINDOW_S", "0.01", "must be at least 0.1"),
    ("KEYQ_RECONCILE_INTERVAL_S", "fast", "is not a number"),
    ("KEYQ_RECONCILE_BATCH", "0", "must be at least 1"),
    ("KEYQ_RECONCILE_BUDGET_S", "-1", "must be at least 0.01"),
    ("KEYQ_CALL_TIMEOUT_S", "0", "must be at least 0.01"),
    ("KEYQ_METRICS_PORT", "http", "is not an integer"),
    ("KEYQ_NAMESPACE", "Bad Space", "must match"),
    ("KEYQ_NAMESPACE", "9lives", "must match"),
    ("KEYQ_REDIS_URL", "http://localhost:6379", "must start with one of redis://"),
    ("KEYQ_BROKER_URL", "amqp://guest@rabbit//", "must start with one of redis://"),
    ("KEYQ_BROKER_URL", "unix:///tmp/redis.sock", "must start with one of redis://"),
    ("KEYQ_DATABASE_URL", "mysql://root@db/keyq", "must start with one of sqlite://"),
    ("KEYQ_DATABASE_URL", "keyq.sqlite3", "must start with one of sqlite://"),
    ("KEYQ_FOLLOW_ON", "maybe", "is not a switch: write 1 or 0"),
    ("KEYQ_FOLLOW_ON", "2", "is not a switch"),
    ("KEYQ_REPLY_SPIN_US", "-1", "must be at least 0"),
    ("KEYQ_REPLY_SPIN_US", "10001", "is more than 10000"),
    ("KEYQ_REPLY_SPIN_US", "fast", "is not an integer"),
]


@pytest.mark.parametrize(("variable", "raw", "message"), BAD_VALUES)
def test_bad_value_is_refused_naming_the_variable(variable: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        Settings.from_env({variable: raw})
    assert str(info.value).startswith(f"{variable}="), str(info.value)


def test_dedupe_window_smaller_than_batch_is_refused_with_a_fix() -> None:
    env = {"KEYQ_DEDUPE_WINDOW": "10", "KEYQ_BATCH_MAX": "20"}
    with pytest.raises(
        ConfigurationError, match="KEYQ_DEDUPE_WINDOW=10 is smaller than KEYQ_BATCH_MAX=20"
    ) as info:
        Settings.from_env(env)
    assert "raise the window" in str(info.value)
    assert Settings.from_env({"KEYQ_DEDUPE_WINDOW": "20", "KEYQ_BATCH_MAX": "20"}).batch_max == 20


def test_with_refuses_contradictions_too() -> None:
    with pytest.raises(ConfigurationError, match="KEYQ_DEDUPE_WINDOW"):
        Settings().with_(batch_max=10_000)
    assert Settings().with_(max_payload_bytes=10).max_payload_bytes == 10


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:s3cret@host:6379/0", "redis://user:***@host:6379/0"),
        ("postgresql://keyq:p%40ss@db:5432/keyq", "postgresql://keyq:***@db:5432/keyq"),
        ("rediss://u:a@b@host/1", "rediss://u:***@host/1"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("sqlite:///keyq.sqlite3", "sqlite:///keyq.sqlite3"),
    ],
)
def test_redact_url_hides_passwords(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_safe_summary_never_contains_a_password() -> None:
    s = Settings.from_env(
        {
            "KEYQ_REDIS_URL": "redis://:redispw@cache:6379/0",
            "KEYQ_BROKER_URL": "redis://admin:brokerpw@broker:6379/1",
            "KEYQ_DATABASE_URL": "postgresql://keyq:dbpw@db/keyq",
        }
    )
    text = json.dumps(s.safe_summary())
    for secret in ("redispw", "brokerpw", "dbpw"):
        assert secret not in text
    assert s.safe_summary()["database_url"] == "postgresql://keyq:***@db/keyq"
    assert "dbpw" not in repr(s.safe_summary())


def test_bad_url_error_does_not_leak_its_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"KEYQ_DATABASE_URL": "mysql://root:topsecret@db/keyq"})
    assert "topsecret" not in str(info.value)
    assert "mysql://root:***@db/keyq" in str(info.value)


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().partitions = 2  # type: ignore[misc]


def test_queue_and_redis_key_names_carry_the_namespace() -> None:
    s = Settings.from_env({"KEYQ_NAMESPACE": "shop"})
    assert s.queue_name(7) == "shop.p7"
    assert s.redis_key("reply", "abc") == "shop:reply:abc"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("0", False), ("True", True), ("false", False), (" ON ", True), ("no", False)],
)
def test_a_switch_reads_the_usual_spellings(raw: str, expected: bool) -> None:
    assert Settings.from_env({"KEYQ_FOLLOW_ON": raw}).follow_on is expected


def test_to_env_round_trips_through_from_env() -> None:
    """What a parent process hands its workers is read back as exactly the same settings."""
    original = Settings.from_env(
        {
            "KEYQ_REDIS_URL": "redis://127.0.0.1:6379/3",
            "KEYQ_DATABASE_URL": "postgresql://u:secret@db:5432/k",
            "KEYQ_ENTITY_MODULES": "keyq.examples,tests.entities",
            "KEYQ_PARTITIONS": "12",
            "KEYQ_IDLE_TIMEOUT_S": "0.25",
            "KEYQ_RECONCILE_BUDGET_S": "0.1",
            "KEYQ_FOLLOW_ON": "0",
        }
    )
    env = original.to_env()
    fields = {f.name for f in dataclasses.fields(Settings)} - {"extra"}
    assert set(ENV_VARIABLES) == fields  # every setting has its variable
    assert Settings.from_env(env) == original
