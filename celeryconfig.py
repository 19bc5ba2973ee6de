"""Celery settings for the plain `celery` and `flower` commands, read from the environment.

keyq's own commands (`keyq worker`, `keyq beat`) build the same configuration themselves; this
module exposes it to Celery's tools, e.g.

    celery --config celeryconfig flower --basic-auth="$FLOWER_USER:$FLOWER_PASSWORD"
    celery --config celeryconfig inspect active_queues
"""

from keyq.celery_app import celery_settings
from keyq.settings import Settings

globals().update(celery_settings(Settings.from_env()))
