"""The HTTP side of metrics for both processes: /metrics, /healthz and /readyz on one small server.

The metrics themselves are declared once per side: coordinator.metrics and edge_agent.metrics.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds would flood the log
        pass


Probe = Callable[[], tuple[bool, str]]


def serve(registry: CollectorRegistry, host: str, port: int, ready: Probe | None = None) -> int:
    """Serve /metrics, /healthz (the process answers) and /readyz (ready() holds); port 0 picks one.

    Returns the bound port.
    """
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok, reason = ready() if path == "/readyz" and ready is not None else (True, "ok")
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [f"{reason}\n".encode()]
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result

    httpd = make_server(host, port, app, _Server, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return int(httpd.server_port)
