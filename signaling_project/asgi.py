"""ASGI entry point: `daphne signaling_project.asgi:application`.

HTTP goes to Django; WebSocket upgrades at `/` and `/ws/` go to the signaling
consumer. Django is set up before the routing import, as Channels requires.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "signaling_project.settings")
django_asgi_app = get_asgi_application()

from channels.layers import get_channel_layer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from calls.process.routing import websocket_urlpatterns  # noqa: E402
from calls.realtime.security import OriginValidator  # noqa: E402
from calls.server import daphne as daphne_server  # noqa: E402

# daphne tuning: a cap on what a client that stops reading can pile up, and a
# graceful drain on SIGTERM (calls/server/daphne.py).
daphne_server.install()
# Built now rather than on the first connection: the Redis layer refuses, at start-up,
# versions of channels-redis and redis-py it was not tested with (calls/realtime/redis_layer.py).
get_channel_layer()

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": OriginValidator(URLRouter(websocket_urlpatterns)),
    }
)
