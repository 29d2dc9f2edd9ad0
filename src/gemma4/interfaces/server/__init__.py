"""`gemma4 serve`: an OpenAI-compatible HTTP server over one engine worker.

It listens at once (GET /health answers 503 while the model loads), loads in the background,
and binds to localhost unless told otherwise."""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from ...errors import Gemma4Error
from ...runtime.engine import Model
from .app import create_app
from .metrics import Metrics
from .served import ServedModel


def served_name(model: str | Path) -> str:
    """The id clients ask for: the checkpoint folder's or the file's name."""
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def listen(host: str, port: int) -> socket.socket:
    """Bind first, so a port in use is one clear error instead of a server that half starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise Gemma4Error(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host") from None
    return sock


def serve(
    loader: Callable[[], Model],
    name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    parallel: int | None = None,
    max_queue: int = 64,
    metrics: bool = False,
) -> None:
    import uvicorn

    if not is_loopback(host) and not api_key:
        print(f"gemma4 serve: warning: listening on {host} without an API key: anyone who can reach this machine can use it "
              "(set --api-key or --api-key-file)", file=sys.stderr)
    sock = listen(host, port)
    served = ServedModel(name)
    app = create_app(served, api_key, Metrics(served) if metrics else None)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    failure: list[Exception] = []

    def load() -> None:
        try:
            served.load(loader, parallel, max_queue)
        except (Gemma4Error, ValueError, OSError) as e:
            failure.append(e)
            server.should_exit = True
            return
        plan = served.plan
        print(f"gemma4 serve: {name} ready at http://{host}:{sock.getsockname()[1]}/v1 — {plan['parallel']} parallel "
              f"sequences of up to {plan['context']} tokens, K/V planned at most {plan['kv_bytes'] / 1e9:.2f} GB", file=sys.stderr, flush=True)

    print(f"gemma4 serve: listening on http://{host}:{sock.getsockname()[1]} (loading {name}...)", file=sys.stderr, flush=True)
    threading.Thread(target=load, name="gemma4-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        served.close()
    if failure:
        raise Gemma4Error(str(failure[0])) if not isinstance(failure[0], Gemma4Error) else failure[0]
