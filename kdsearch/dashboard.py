"""`kdsearch dashboard`: optuna-dashboard on the study storage, best-student checkpoints downloadable.

optuna-dashboard's API can change and delete studies and artifacts, so it binds to loopback unless
the user asks for more, and says so in one line when it serves beyond this machine.
"""

from __future__ import annotations

import ipaddress
import signal
import threading
from collections.abc import Callable
from typing import Any

from kdsearch.errors import Terminated, UserError
from kdsearch.storage import ArtifactDirectory, open_existing_storage, redact


def dashboard_app(storage_url: str | None) -> Any:
    """optuna-dashboard's WSGI app on the study storage, with kdsearch's artifact store."""
    import optuna_dashboard

    storage, url = open_existing_storage(storage_url)
    if storage is None:
        raise UserError(f"no studies in {redact(url)} yet: run `kdsearch optimize` first")
    return optuna_dashboard.wsgi(storage, artifact_store=ArtifactDirectory())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(storage_url: str | None, host: str, port: int, log: Callable[[str], None]) -> None:
    """Serve until interrupted."""
    from wsgiref.simple_server import make_server

    app = dashboard_app(storage_url)
    try:
        server = make_server(host, port, app)
    except (OSError, OverflowError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UserError(f"cannot listen on {host}:{port}: {reason}") from None
    _, url = open_existing_storage(storage_url)
    if not is_loopback(host):
        log(
            f"warning: serving on {host}, beyond this machine: anyone who can reach port {server.server_port} "
            "can read, change and delete these studies and their checkpoints"
        )
    log(f"dashboard for {redact(url)} at http://{host}:{server.server_port}/")
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
