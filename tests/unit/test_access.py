"""Who is at the other end (users/peer.py), the client's checks before it sends the token
(control/verify.py), and who the host proxy serves (users/access.py), without root."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmbusify.config import ProxyConfig, Role
from vmbusify.control.sockdir import prepare_dir
from vmbusify.control.token import ensure_token, read_token_owned
from vmbusify.control.verify import connect_verified
from vmbusify.errors import ConfigError, ControlError
from vmbusify.users import peer
from vmbusify.users.access import (
    AccessMode,
    Credentials,
    LocalUsers,
    access_mode,
    read_credentials,
)


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the connecting end, the accepted end) of a loopback connection."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    client = socket.create_connection(srv.getsockname())
    accepted, _ = srv.accept()
    srv.close()
    yield client, accepted
    client.close()
    accepted.close()


# -- peer ----------------------------------------------------------------------------------

def test_the_owner_of_the_other_end_is_found(tcp_pair: tuple[socket.socket, socket.socket]
                                             ) -> None:
    client, accepted = tcp_pair
    assert peer.tcp_peer_uid(accepted) == os.geteuid()
    other = peer.tcp_peer(client)
    assert other is not None and other.uid == os.geteuid()
    assert other.state == peer.TCP_ESTABLISHED and other.inode > 0


def test_sock_diag_and_proc_agree(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    _client, accepted = tcp_pair
    mine, theirs = accepted.getsockname(), accepted.getpeername()
    args = (socket.AF_INET, theirs[0], theirs[1], mine[0], mine[1])
    via_proc = peer._proc(*args)
    assert via_proc is not None and via_proc.uid == os.geteuid()
    try:
        via_diag = peer._diag(*args)
    except OSError:
        pytest.skip("no sock_diag here")
    assert via_diag is not None
    assert (via_diag.uid, via_diag.state, via_diag.inode) == (
        via_proc.uid, via_proc.state, via_proc.inode)


def test_a_closed_peer_is_nobody_not_root(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """What a closed socket leaves (FIN_WAIT2, TIME_WAIT) shows uid 0: that is not root."""
    client, accepted = tcp_pair
    client.close()
    time.sleep(0.05)
    assert peer.tcp_peer_uid(accepted) is None


def test_ipv6_and_v4_mapped_peers() -> None:
    srv = socket.socket(socket.AF_INET6)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.bind(("::", 0))
    srv.listen()
    port = srv.getsockname()[1]
    for host in ("::1", "127.0.0.1"):
        with socket.create_connection((host, port)) as client:
            accepted, _ = srv.accept()
            with accepted:
                assert peer.tcp_peer_uid(accepted) == os.geteuid(), host
                other = peer.tcp_peer(client)
                assert other is not None and other.uid == os.geteuid(), host
    srv.close()


def test_unix_peer_uid(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    with a, b:
        assert peer.unix_peer_uid(a) == os.geteuid()


# -- verify (the client's side) ------------------------------------------------------------

def _serve_unix(path: Path) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen()  # never accepts: a Unix client connects to the backlog, SO_PEERCRED works
    return srv


def test_a_unix_listener_of_this_user_is_trusted(tmp_path: Path) -> None:
    d = tmp_path / "control"
    prepare_dir(str(d), None)
    srv = _serve_unix(d / "control.sock")
    with srv, connect_verified("unix", str(d / "control.sock"), 0, os.geteuid()) as s:
        assert s.family == socket.AF_UNIX


@pytest.mark.parametrize(("mode", "why"), [(0o777, "writable by others"),
                                           (0o770, "writable by others")])
def test_a_listener_directory_others_may_write_is_refused(tmp_path: Path, mode: int,
                                                          why: str) -> None:
    d = tmp_path / "control"
    d.mkdir()
    srv = _serve_unix(d / "control.sock")
    d.chmod(mode)
    with srv, pytest.raises(ControlError, match=why) as err:
        connect_verified("unix", str(d / "control.sock"), 0, os.geteuid())
    assert "refusing to send the control token" in str(err.value)


def test_a_full_backlog_is_waited_out_not_an_error(tmp_path: Path) -> None:
    """A burst of clients fills the listener's accept queue: Linux answers a Unix connect
    with EAGAIN at once then, and the client waits until the listener accepts (or its
    timeout runs out, said in words), instead of failing on the spot."""
    import threading

    d = tmp_path / "control"
    prepare_dir(str(d), None)
    path = d / "control.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(0)
    queued = []
    try:
        for _ in range(64):  # fill the queue: connects that the listener never accepts
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            if s.connect_ex(str(path)) != 0:
                s.close()
                break
            queued.append(s)
        with pytest.raises(ControlError, match="backlog stayed full"):
            connect_verified("unix", str(path), 0, os.geteuid(), 0.3)

        def accept_later() -> None:
            time.sleep(0.3)
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                conn.close()

        threading.Thread(target=accept_later, daemon=True).start()
        t0 = time.monotonic()
        with connect_verified("unix", str(path), 0, os.geteuid(), 5.0) as s:
            assert s.family == socket.AF_UNIX
        assert 0.2 < time.monotonic() - t0 < 5.0
    finally:
        for s in queued:
            s.close()
        srv.close()


def test_a_missing_listener_is_said_plainly(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="is not running"):
        connect_verified("unix", str(tmp_path / "none" / "control.sock"), 0, os.geteuid())
    d = tmp_path / "control"
    d.mkdir(mode=0o700)
    (d / "control.sock").write_text("")
    with pytest.raises(ControlError, match="not a socket"):
        connect_verified("unix", str(d / "control.sock"), 0, os.geteuid())
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    srv.close()
    with pytest.raises(ControlError, match="is not running"):
        connect_verified("tcp", "127.0.0.1", port, os.geteuid())


def test_a_tcp_listener_of_this_user_is_trusted() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()  # never accepts: the connection waits in its queue, its owner known
    with srv, connect_verified("tcp", "127.0.0.1", srv.getsockname()[1], os.geteuid()) as s:
        assert s.getpeername() == srv.getsockname()


# -- the token and the listener's directory ------------------------------------------------

def test_token_modes(tmp_path: Path) -> None:
    d = tmp_path / "control"
    prepare_dir(str(d), None)
    assert d.stat().st_mode & 0o777 == 0o700
    token = ensure_token(d / "control.token")
    assert (d / "control.token").stat().st_mode & 0o777 == 0o600
    assert read_token_owned(d / "control.token") == (token, os.geteuid())
    gid = os.getegid()
    prepare_dir(str(d), gid)
    assert ensure_token(d / "control.token", gid) == token  # kept, opened to the group
    assert d.stat().st_mode & 0o777 == 0o750
    assert (d / "control.token").stat().st_mode & 0o777 == 0o640


def test_a_token_that_is_a_link_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("not-a-token\n")
    link = tmp_path / "control.token"
    link.symlink_to(target)
    token = ensure_token(link)
    assert token != "not-a-token" and not link.is_symlink()
    assert target.read_text() == "not-a-token\n" and target.stat().st_mode & 0o777 != 0o600


def test_malformed_tokens_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text("abc\r\nX-Injected: 1\n")
    with pytest.raises(ControlError, match="malformed"):
        read_token_owned(path)


# -- who the proxy serves ------------------------------------------------------------------

def test_access_modes() -> None:
    assert access_mode(ProxyConfig(), Role.HOST) is AccessMode.GROUP
    assert access_mode(ProxyConfig(), Role.GUEST) is AccessMode.OPEN
    assert access_mode(ProxyConfig(username="u", password="p"), Role.GUEST) is \
        AccessMode.CREDENTIALS
    assert access_mode(ProxyConfig(credentials_file="/x"), Role.GUEST) is AccessMode.CREDENTIALS
    assert access_mode(ProxyConfig(access="open"), Role.HOST) is AccessMode.OPEN


def test_local_users() -> None:
    users = LocalUsers("no-such-group-vbt")
    assert users.privileged(0) and users.privileged(os.geteuid())
    assert not users.privileged(None)
    assert not users.privileged(65534)
    assert not LocalUsers("").privileged(65534)


def _creds(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "creds"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_credentials_file(tmp_path: Path) -> None:
    path = _creds(tmp_path, "# comment\n\nalice:wonder land\nbob:b:c\n")
    assert read_credentials(str(path)) == {"alice": "wonder land", "bob": "b:c"}
    creds = Credentials(str(path), "inline", "pw")
    assert creds.configured
    assert creds.check("alice", "wonder land") and creds.check("bob", "b:c")
    assert creds.check("inline", "pw")
    assert not creds.check("alice", "wonder") and not creds.check("carol", "")
    path.write_text("carol:new\n")  # re-read when it changes
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert creds.check("carol", "new") and not creds.check("alice", "wonder land")
    path.chmod(0o644)  # opened to others: none of it counts any more
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert not creds.check("carol", "new") and creds.check("inline", "pw")


@pytest.mark.parametrize(("text", "mode", "why"), [
    ("a:b\n", 0o644, "group or others may read"),
    ("a:b\n", 0o640, "group or others may read"),
    ("nocolon\n", 0o600, "expected user:password"),
    (":pw\n", 0o600, "expected user:password"),
    ("u:" + "x" * 300 + "\n", 0o600, "longer than 255"),
])
def test_bad_credentials_files_are_clear_errors(tmp_path: Path, text: str, mode: int,
                                                why: str) -> None:
    path = _creds(tmp_path, text, mode)
    with pytest.raises(ConfigError, match=why):
        Credentials(str(path))
    with pytest.raises(ConfigError, match="No such file"):
        Credentials(str(tmp_path / "missing"))
