"""Client of the command listener, for vmbusifyctl (stdlib only, so it starts fast)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from vmbusify.config_file import parse_control_listen
from vmbusify.control.token import read_token_owned
from vmbusify.control.verify import connect_verified, describe
from vmbusify.errors import ControlError, VMBusifyError, error_from

if TYPE_CHECKING:
    import http.client

    from vmbusify.config import Config
    from vmbusify.control.exec_wire import Listener


class ControlClient:
    """Talks HTTP + bearer token to the command listener of this endpoint, after checking
    that the listener is root's (control/verify.py): the token goes nowhere else."""

    def __init__(self, config: Config, timeout: float = 30.0) -> None:
        self.config: Config | None = config
        self._setup(config.control.listen, str(config.token_path), timeout)

    @classmethod
    def for_listener(cls, listen: str, token_path: str, timeout: float = 30.0
                     ) -> ControlClient:
        """A client from the listener's address and token file alone (``vmbusifyctl`` reads
        just these with config_file, not the whole model, which costs its start)."""
        client = cls.__new__(cls)
        client.config = None
        client._setup(listen, token_path, timeout)
        return client

    def _setup(self, listen: str, token_path: str, timeout: float) -> None:
        self.kind, self.where, self.port = parse_control_listen(listen)
        self.token_path = token_path
        self.timeout = timeout
        self._token: tuple[str, int] | None = None

    @property
    def address(self) -> str:
        """The listener's address as the config says it (for messages)."""
        return describe(self.kind, self.where, self.port)

    def _token_owned(self) -> tuple[str, int]:
        if self._token is None:
            self._token = read_token_owned(self.token_path)
        return self._token

    def connection(self, timeout: float | None = None) -> http.client.HTTPConnection:
        """A new HTTP connection to the listener, already connected and verified (raises
        ControlError with the reason when the listener is not one to send the token to)."""
        import http.client  # here: loading it costs every vmbusifyctl start

        _token, owner = self._token_owned()
        sock = connect_verified(self.kind, self.where, self.port, owner,
                                timeout or self.timeout)
        conn = http.client.HTTPConnection("localhost" if self.kind == "unix" else self.where,
                                          self.port or None, timeout=timeout or self.timeout)
        conn.sock = sock
        return conn

    def listener(self) -> Listener:
        """This listener as the exec wire takes it (control/exec_wire.py: an exec, or a copy's
        transport), with the token (read once)."""
        # Imported here: vmbusifyctl's other commands need none of the exec wire.
        from vmbusify.control.exec_wire import Listener

        return Listener(self.kind, self.where, self.port, *self._token_owned())

    def headers(self) -> dict[str, str]:
        """The Authorization header (reads the token once)."""
        return {"Authorization": f"Bearer {self._token_owned()[0]}"}

    def request(self, method: str, path: str, body: Any = None,
                timeout: float | None = None) -> Any:
        """One JSON request; returns the decoded body, or raises the listener's error (its
        class by the body's ``code``; ControlError when it gives none) with the reason."""
        headers = self.headers()
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = self.connection(timeout)  # verified before a byte is sent
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except TimeoutError:
            raise ControlError(f"the command listener did not answer within "
                               f"{timeout or self.timeout:g}s") from None
        except OSError as exc:
            raise ControlError(f"lost the command listener at {self.address}: "
                               f"{exc.strerror or exc}") from None
        finally:
            conn.close()
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            raise ControlError(f"the command listener sent a non-JSON answer "
                               f"(HTTP {resp.status})") from None
        if resp.status >= 400:
            raise _error_of(decoded, f"HTTP {resp.status} {resp.reason}")
        return decoded


def _error_of(doc: Any, fallback: str) -> VMBusifyError:
    """The error an error body stands for: ``{"error": reason, "code": ErrorCode}``."""
    msg = doc.get("error") if isinstance(doc, dict) else None
    code = doc.get("code") if isinstance(doc, dict) else None
    text = str(msg) if msg else fallback
    if not isinstance(code, int) or isinstance(code, bool):
        return ControlError(text)  # a refusal without a code (bad token, bad request)
    return error_from(code, text)


def q(part: str) -> str:
    """Quote one path segment."""
    return quote(part, safe="")
