"""The host's web dashboard and HTTP API (``[web] listen``): pages, JSON, ``/metrics``.

Modules: :mod:`.app` (server and routes), :mod:`.pages` (HTML), :mod:`.data` (ledger
reads for the pages), :mod:`.metrics` (Prometheus), :mod:`.auth` (sessions, the action
rule), :mod:`.actions` (kill, and later pause/resume). ``static/`` holds the only style
sheet and script; nothing is fetched from elsewhere.
"""

from hakuriver.host.web.app import WebContext, WebServer

__all__ = ["WebContext", "WebServer"]
