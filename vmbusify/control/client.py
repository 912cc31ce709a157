"""Client of the command listener, for vmbusifyctl (stdlib only, so it starts fast)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from vmbusify.config_file import split_listen
from vmbusify.control.token import read_token
from vmbusify.errors import ControlError

if TYPE_CHECKING:
    import http.client

    from vmbusify.config import Config


class ControlClient:
    """Talks HTTP + bearer token to the command listener of this endpoint."""

    def __init__(self, config: Config, timeout: float = 30.0) -> None:
        self.config = config
        self.host, self.port = split_listen(config.control.listen)
        self.timeout = timeout
        self._token: str | None = None

    def connection(self, timeout: float | None = None) -> http.client.HTTPConnection:
        """A new HTTP connection to the listener."""
        import http.client  # here: loading it costs every vmbusifyctl start

        return http.client.HTTPConnection(self.host, self.port,
                                          timeout=timeout or self.timeout)

    def headers(self) -> dict[str, str]:
        """The Authorization header (reads the token once)."""
        if self._token is None:
            self._token = read_token(self.config.token_path)
        return {"Authorization": f"Bearer {self._token}"}

    def request(self, method: str, path: str, body: Any = None,
                timeout: float | None = None) -> Any:
        """One JSON request; returns the decoded body or raises ControlError with the reason."""
        headers = self.headers()
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = self.connection(timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except ConnectionRefusedError:
            raise ControlError(
                f"the command listener at {self.host}:{self.port} is not running "
                "(check: supervisorctl status control)") from None
        except TimeoutError:
            raise ControlError(f"the command listener did not answer within "
                               f"{timeout or self.timeout:g}s") from None
        except OSError as exc:
            raise ControlError(f"cannot reach the command listener at "
                               f"{self.host}:{self.port}: {exc}") from None
        finally:
            conn.close()
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            raise ControlError(f"the command listener sent a non-JSON answer "
                               f"(HTTP {resp.status})") from None
        if resp.status >= 400:
            msg = decoded.get("error") if isinstance(decoded, dict) else None
            raise ControlError(msg or f"HTTP {resp.status} {resp.reason}")
        return decoded


def q(part: str) -> str:
    """Quote one path segment."""
    return quote(part, safe="")
