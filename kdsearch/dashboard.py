"""`kdsearch dashboard`: optuna-dashboard on the study storage, best-student checkpoints downloadable.

optuna-dashboard's API can change and delete studies and artifacts, so it binds to loopback unless
the user asks for more, and says so in one line when it serves beyond this machine. Binding to
loopback alone does not keep a web page out: a page on ``evil.example.com`` whose name is made to
resolve to 127.0.0.1 (DNS rebinding) talks to the dashboard as its own origin. Such a request still
names ``evil.example.com`` in its Host header, so every request whose Host is not this machine's
loopback, or the host the user asked for, is answered 403; and no response invites other origins
(optuna-dashboard marks artifact downloads ``Access-Control-Allow-Origin: *``).
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from kdsearch.artifacts import ArtifactDirectory
from kdsearch.errors import ConfigError, Terminated, UserError
from kdsearch.storage import no_studies_in, open_existing_storage, redact

# Addresses that mean "every interface": the Host header then names this machine by any address.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def dashboard_app(storage_url: str | None) -> Any:
    """optuna-dashboard's WSGI app on the study storage, with kdsearch's artifact store."""
    import optuna_dashboard

    storage, url = open_existing_storage(storage_url)
    if storage is None:
        raise UserError(f"{no_studies_in(url)} yet: run `kdsearch optimize` first")
    return optuna_dashboard.wsgi(storage, artifact_store=ArtifactDirectory())


def is_loopback(host: str) -> bool:
    """``localhost`` or an address of 127.0.0.0/8 or ``::1`` (brackets and a final dot allowed)."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_of(header: str) -> str:
    """The host a Host header names, without its port or an IPv6 address's brackets, lower-case."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[1:end] if end > 0 else header
    name, colon, port = header.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        header = name
    return header.rstrip(".")


def host_allowed(header: str | None, bound: str) -> bool:
    """Whether a request's Host header names this machine as the user reached it.

    Allowed: loopback names and addresses, the host the dashboard was started with, and, when it
    listens on every interface, any IP address (a rebinding page always sends its own *name*; an
    address in the Host header means the browser was pointed at that address itself).
    """
    if not header:
        return False
    name = host_of(header)
    wanted = bound.strip("[]").rstrip(".").lower()
    if is_loopback(name) or name == wanted:
        return True
    return wanted in WILDCARD_HOSTS and _is_address(name)


def guarded(app: WSGIApp, bound: str) -> WSGIApp:
    """``app`` answering 403 to any request for another host, and never granting other origins (CORS)."""

    def guard(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        header = environ.get("HTTP_HOST")
        if not host_allowed(header, bound):
            reach = "127.0.0.1" if bound in WILDCARD_HOSTS else bound
            body = (
                f"kdsearch dashboard: refused a request for host {header!r:.80}: open it as "
                f"http://{f'[{reach}]' if ':' in reach else reach}:{environ.get('SERVER_PORT')}/ "
                "or start the dashboard on the host name you use\n"
            ).encode()
            start_response(
                "403 Forbidden", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
            )
            return [body]

        def start(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            kept = [(name, value) for name, value in headers if not name.lower().startswith("access-control-allow-")]
            return start_response(status, kept, *exc_info)

        return app(environ, start)

    return guard


def _server_class(host: str) -> type:
    """wsgiref's server for the address family ``host`` needs (``::1`` and other IPv6 ones: AF_INET6)."""
    from wsgiref.simple_server import WSGIServer

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if family == socket.AF_INET and not _is_address(host):
        try:
            family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]
        except OSError:
            pass  # binding says why, in the message serve() gives
    if family != socket.AF_INET6:
        return WSGIServer
    return type("WSGIServer6", (WSGIServer,), {"address_family": socket.AF_INET6})


def serve(storage_url: str | None, host: str, port: int, log: Callable[[str], None]) -> None:
    """Serve until interrupted."""
    from wsgiref.simple_server import make_server

    host = host.strip().strip("[]")
    if not host:
        raise ConfigError("host", "must be an address or a name to listen on, such as 127.0.0.1 or ::1")
    app = guarded(dashboard_app(storage_url), host)
    shown = f"[{host}]" if ":" in host else host
    try:
        server = make_server(host, port, app, server_class=_server_class(host))
    except (OSError, OverflowError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UserError(f"cannot listen on {shown}:{port}: {reason}") from None
    _, url = open_existing_storage(storage_url)
    if not is_loopback(host):
        log(
            f"warning: serving on {host}, beyond this machine: anyone who can reach port {server.server_port} "
            "can read, change and delete these studies and their checkpoints"
        )
    log(f"dashboard for {redact(url)} at http://{shown}:{server.server_port}/")
    # wsgiref's request handler swallows any exception raised inside a request (KeyboardInterrupt
    # included), so Ctrl-C and SIGTERM ask the serving loop to stop instead of raising into it.
    stopped: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        stopped.append(signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {signum: signal.signal(signum, stop) for signum in handled}
    try:
        server.serve_forever()
    finally:
        server.server_close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stopped:
        raise Terminated(stopped[0]) if stopped[0] == signal.SIGTERM else KeyboardInterrupt()
