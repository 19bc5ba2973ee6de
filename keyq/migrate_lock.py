"""Schema upgrades serialised by a Redis lock, so many workers starting at once are safe."""

from __future__ import annotations

import redis

from keyq.connections import redis_client
from keyq.errors import CacheUnavailableError, RepoError
from keyq.repo import Repo, wait_for_repo
from keyq.settings import Settings

MIGRATE_LOCK_TIMEOUT_S = 120  # a migration that runs longer than this loses its lock


def migrate_with_lock(settings: Settings, wait_s: float = 30.0) -> str | None:
    """Wait for the database, then upgrade it under a lock shared by every node.

    Returns keyq's revision after the upgrade.
    """
    repo = Repo(
        settings.database_url, timeouts=settings.timeouts.without_statement_timeout()
    )
    try:
        wait_for_repo(repo, wait_s)
        client = redis_client(settings.redis_url, settings.timeouts)
        try:
            with client.lock(
                settings.redis_key("migrate", "lock"),
                timeout=MIGRATE_LOCK_TIMEOUT_S,
                blocking_timeout=wait_s * 4,
            ):
                return repo.migrate()
        except redis.exceptions.LockError as e:
            raise RepoError(f"could not take the migration lock: {e}") from e
        except redis.RedisError as e:
            raise CacheUnavailableError(f"Redis is not answering: {e}") from e
        finally:
            client.close()
    finally:
        repo.dispose()
