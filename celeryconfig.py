"""Celery settings for the plain `celery` and `flower` commands, read from the environment.

keyq's own commands (`keyq worker`, `keyq beat`) build the same configuration themselves; this
module exposes it to Celery's tools, e.g.

    celery --config celeryconfig flower --basic-auth="$FLOWER_USER:$FLOWER_PASSWORD"
    celery --config celeryconfig inspect active_queues
"""

import kombu.transport as _kombu_transport

from keyq.celery_app import celery_settings
from keyq.settings import Settings

# keyq's transport under the name "redis": Flower recognises a broker by its URL's scheme, and
# kombu writes a `broker_transport` class path into that scheme ("'keyq.transport:Transport'
# broker is not supported", no queue lengths). With the alias the URL stays redis://, and
# Flower's Broker page reads every partition queue's length; the tools still publish through
# keyq's transport. Only processes that load this module (celery, flower) see the alias.
_kombu_transport.TRANSPORT_ALIASES["redis"] = "keyq.transport:Transport"
_kombu_transport.TRANSPORT_ALIASES["sentinel"] = "keyq.transport:SentinelTransport"
_conf = celery_settings(Settings.from_env())
_conf.pop("broker_transport")
globals().update(_conf)
