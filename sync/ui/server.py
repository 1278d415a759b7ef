"""Running the explorer: the binding rules and uvicorn."""

from __future__ import annotations

import ipaddress
import secrets

from vectorsync.sync.spec import Config, SpecError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plan(host: str, port: int, *, allow_remote: bool, token: str | None) -> tuple[str, str | None]:
    """The URL to open and the token every request must carry (None on loopback without one)."""
    if is_loopback(host):
        return f"http://{host}:{port}/" + (f"?token={token}" if token else ""), token
    if not allow_remote:
        raise SpecError(
            f"binding to {host!r} exposes the UI beyond this machine; pass --allow-remote "
            "(every request then needs a token) or keep the default 127.0.0.1"
        )
    token = token or secrets.token_urlsafe(24)
    return f"http://{host}:{port}/?token={token}", token


def serve(url: str, config: Config, *, host: str, port: int, token: str | None, allow_retry: bool) -> None:
    import uvicorn

    from vectorsync.sync.ui.app import Settings, create_app

    app = create_app(Settings(url, config, allow_retry=allow_retry, token=token))
    uvicorn.run(app, host=host, port=port, log_level="warning")
