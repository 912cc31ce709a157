"""The lab itself: namespaces, addresses, isolation, status, idempotence, a clean `down`.

No test here sends a packet: reachability is checked with ``ip route get`` (a routing-table
lookup) and names with ``getent hosts`` against the lab's own hosts files. The first tests
need no root; the rest use ``lab_up`` and run last in the session (tests/e2e/conftest.py),
because some take the lab down and bring it back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
import tomllib
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from vmbusify.cli.main import main
from vmbusify.config import Role, load_config
from vmbusify.lab import program_pid, run_in_vm, stack_for, stack_processes, supervisorctl_command
from vmbusify.lab.layout import (
    ETC_NETNS,
    LAB_ROOT,
    LabLayout,
    guest_config,
    host_config,
    hosts_file,
    resolv_conf,
    toml_dumps,
)
from vmbusify.lab.layout import INSTANCE as _INSTANCE
from vmbusify.lab.stack import supervisorctl
from vmbusify.lab.testing import BIN, LabHandle, lab_status, vm_states, vmbusify

# These tests check the documented names of the default lab (the one CI and bin/lab use).
pytestmark = pytest.mark.skipif(bool(_INSTANCE), reason="checks the default lab instance only")

LAB_NETNS = ["vmbl-ext", "vmbl-vm1", "vmbl-vm2"]


# --- without root -------------------------------------------------------------------------


def test_generated_configs_load(tmp_path: Path) -> None:
    layout = LabLayout(tmp_path)
    vms = layout.vms(2)
    (tmp_path / "guest.toml").write_text(guest_config(vms[0]))
    (tmp_path / "host.toml").write_text(host_config(layout, vms))

    guest = load_config(tmp_path / "guest.toml")
    assert guest.role is Role.GUEST and guest.name == "vm1"
    assert guest.tunnel.listen == f"unix:{tmp_path}/vm1/tunnel.sock"
    assert guest.run_dir == f"{tmp_path}/vm1/run" and guest.state_dir == f"{tmp_path}/vm1/state"
    assert guest.tunnel.key_file == f"{tmp_path}/vm1/tunnel.key"  # a key per VM

    host = load_config(tmp_path / "host.toml")
    assert host.role is Role.HOST and host.host.keep_connected
    assert [(v.vmid, v.address) for v in host.vms] == [
        ("vm1", f"unix:{tmp_path}/vm1/tunnel.sock"), ("vm2", f"unix:{tmp_path}/vm2/tunnel.sock")]
    assert [v.key_file for v in host.vms] == [f"{tmp_path}/vm1/tunnel.key",
                                              f"{tmp_path}/vm2/tunnel.key"]
    assert host.control.listen == f"unix:{tmp_path}/host/control/control.sock"
    # every machine of the lab shares the filesystem: each its own listener's directory
    assert guest.control.listen == f"unix:{tmp_path}/vm1/control/control.sock"
    assert host.proxy.allow == ["198.18.0.0/24"]
    assert host.subnet.uplink == "vmbl-ext0" and host.subnet.dns_upstream == ["198.18.0.2"]


def test_toml_dumps_round_trips() -> None:
    doc = {"s": 'a "quoted" \\ path\n', "b": False, "n": 3, "f": 0.5, "l": ["x", "y"],
           "t": {"k": "v"}, "a": [{"i": 1}, {"i": 2}]}
    assert tomllib.loads(toml_dumps(doc)) == doc


def test_lab_files_point_only_at_the_lab(tmp_path: Path) -> None:
    layout = LabLayout(tmp_path)
    assert "198.18.0.2\texternal.lab" in hosts_file(layout)
    assert "198.19.3.10\tvm3.lab vm3" in hosts_file(layout, layout.vm(3))
    servers = [ln.split()[1] for ln in resolv_conf(layout).splitlines()
               if ln.startswith("nameserver")]
    assert servers == ["198.18.0.2"]


@pytest.mark.parametrize("args", [["up"], ["up", "--vms", "3"], ["down"], ["status", "--json"]])
def test_lab_refuses_without_root(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(main, ["lab", *args])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: the lab needs root (network namespaces): run it with sudo"]
    assert isinstance(result.exception, SystemExit)  # click's clean exit, not a traceback


@pytest.mark.root
def test_lab_refuses_a_real_non_root_user() -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    proc = subprocess.run(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", str(BIN / "vmbusify"),
         "lab", "up"], check=False, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "Error: the lab needs root (network namespaces): run it with sudo"]


def test_vm_states_finds_the_vms_list() -> None:
    vms = [{"vmid": "vm1", "state": "connected"}, {"vmid": "vm2", "state": "connecting"}]
    assert vm_states({"vms": vms}) == {"vm1": "connected", "vm2": "connecting"}
    assert vm_states({"mux": {"started": 1, "vms": vms}}) == {"vm1": "connected",
                                                              "vm2": "connecting"}
    assert vm_states({"error": "no"}) == {}


# --- with the lab up --------------------------------------------------------------------------


def _ip_json(*args: str) -> list[dict]:
    return json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, text=True,
                                     check=True).stdout)


def _addrs(netns: str | None, ifname: str) -> list[str]:
    where = ["-n", netns] if netns else []
    links = _ip_json(*where, "addr", "show", "dev", ifname)
    return [f"{a['local']}/{a['prefixlen']}" for link in links
            for a in link["addr_info"] if a["family"] == "inet"]


def _netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def test_up_makes_the_namespaces_and_addresses(lab_up: LabHandle) -> None:
    assert set(LAB_NETNS) <= set(_netns())
    for k in (1, 2):
        ns = f"vmbl-vm{k}"
        assert _addrs(ns, "sdn0") == [f"198.19.{k}.10/24"]
        lo = _ip_json("-n", ns, "link", "show", "dev", "lo")[0]
        assert "UP" in lo["flags"]
    assert _addrs("vmbl-ext", "eth0") == ["198.18.0.2/24"]
    assert _addrs(None, "vmbl-ext0") == ["198.18.0.1/24"]
    # passable (to the host's control directory, which decides who enters), not listable
    assert stat.S_IMODE(LAB_ROOT.stat().st_mode) == 0o711
    assert stat.S_IMODE((LAB_ROOT / "host").stat().st_mode) == 0o711
    for private in ("host/run", "host/state", "vm1", "vm2", "ext"):
        assert stat.S_IMODE((LAB_ROOT / private).stat().st_mode) == 0o700, private


def _routes_out(ns: str) -> list[str]:
    """The devices of every default route in ``ns``."""
    return [r["dev"] for r in _ip_json("-n", ns, "route", "show", "default")]


def test_vms_have_no_route_out_but_the_virtual_subnet(lab_up: LabHandle) -> None:
    """The lab gives a VM no way out of its own: only VMBusify's subnet (its TUN) leads out."""
    tun = load_config(LAB_ROOT / "vm1" / "vmbusify.toml").subnet.ifname
    for vmid in ("vm1", "vm2"):
        ns = f"vmbl-{vmid}"
        assert set(_routes_out(ns)) <= {tun}
        for dst in ("198.18.0.2", "198.18.0.1", "192.0.2.1"):  # routing lookups: nothing is sent
            proc = subprocess.run(["ip", "netns", "exec", ns, "ip", "route", "get", dst],
                                  check=False, capture_output=True, text=True)
            assert proc.returncode != 0 or f" dev {tun} " in proc.stdout, proc.stdout
    # Without VMBusify's subnet worker a VM has no route out at all.
    supervisorctl("vm2", "stop", "subnet", check=False)
    try:
        deadline = time.monotonic() + 15
        while _routes_out("vmbl-vm2") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _routes_out("vmbl-vm2") == []
        for dst in ("198.18.0.2", "192.0.2.1", "198.19.1.10"):
            proc = subprocess.run(["ip", "netns", "exec", "vmbl-vm2", "ip", "route", "get", dst],
                                  check=False, capture_output=True, text=True)
            assert proc.returncode != 0 and "unreachable" in proc.stderr, proc.stdout
    finally:
        supervisorctl("vm2", "start", "subnet", check=False)


def test_host_reaches_the_external_network_only_by_its_veth(lab_up: LabHandle) -> None:
    route = _ip_json("route", "get", "198.18.0.2")[0]
    assert route["dev"] == "vmbl-ext0"
    default = _ip_json("-n", "vmbl-ext", "route", "show", "default")
    assert [(r["gateway"], r["dev"]) for r in default] == [("198.18.0.1", "eth0")]


def test_status_json_has_the_documented_shape(lab_up: LabHandle) -> None:
    st = json.loads(vmbusify("lab", "status", "--json").stdout)
    assert [(v["vmid"], v["netns"], v["sdn_ip"]) for v in st["vms"]][:2] == [
        ("vm1", "vmbl-vm1", "198.19.1.10"), ("vm2", "vmbl-vm2", "198.19.2.10")]
    assert st["external"]["netns"] == "vmbl-ext" and st["external"]["ip"] == "198.18.0.2"
    assert st["up"] is True
    for vm in st["vms"]:
        assert Path(vm["config"]).is_file() and Path(vm["run_dir"]).is_dir()
        assert vm["tunnel"] == f"{LAB_ROOT}/{vm['vmid']}/tunnel.sock"
    human = vmbusify("lab", "status").stdout
    assert human.startswith("lab: up") and "vmbl-vm1" in human and "198.18.0.2" in human


def test_configs_on_disk_are_valid(lab_up: LabHandle) -> None:
    host = load_config(LAB_ROOT / "host" / "vmbusify.toml")
    assert host.role is Role.HOST
    assert [v.vmid for v in host.vms] == lab_up.vmids
    for vmid in lab_up.vmids:
        guest = load_config(LAB_ROOT / vmid / "vmbusify.toml")
        assert guest.role is Role.GUEST and guest.name == vmid
        entry = host.vm(vmid)
        assert entry is not None, vmid  # every lab VM is in the host config
        assert entry.address == guest.tunnel.listen == f"unix:{LAB_ROOT}/{vmid}/tunnel.sock"


def test_lab_names_come_from_the_lab_files(lab_up: LabHandle) -> None:
    for ns in LAB_NETNS:
        assert (ETC_NETNS / ns / "hosts").is_file()
        resolv = subprocess.run(["ip", "netns", "exec", ns, "cat", "/etc/resolv.conf"],
                                capture_output=True, text=True, check=True).stdout
        assert [ln.split()[1] for ln in resolv.splitlines() if ln.startswith("nameserver")] == [
            "198.18.0.2"]
        # Found in the hosts file, so no resolver is asked.
        got = subprocess.run(["ip", "netns", "exec", ns, "getent", "ahostsv4", "external.lab"],
                             capture_output=True, text=True, check=True).stdout
        assert got.split()[0] == "198.18.0.2"


def _netns_inode(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def test_each_stack_runs_in_its_own_namespace(lab_up: LabHandle) -> None:
    for target in ["host", *lab_up.vmids]:
        stack = stack_for(target)
        pid = int(stack.pidfile.read_text())
        proc = psutil.Process(pid)
        assert f"{LAB_ROOT}/" in " ".join(proc.cmdline())
        assert proc.environ()["VMBUSIFY_CONFIG"] == str(stack.config)
        if stack.netns is None:
            assert _netns_inode(pid) == _netns_inode("self")
        else:
            ns_pids = subprocess.run(["ip", "netns", "pids", stack.netns], capture_output=True,
                                     text=True, check=True).stdout.split()
            assert str(pid) in ns_pids


def test_helpers(lab_up: LabHandle) -> None:
    assert "198.19.1.10/24" in run_in_vm("vm1", ["ip", "-o", "-4", "addr"]).stdout
    env_out = run_in_vm("vm2", ["env"]).stdout
    assert f"VMBUSIFY_CONFIG={LAB_ROOT}/vm2/vmbusify.toml" in env_out.splitlines()
    argv, env = supervisorctl_command("vm1", "pid")
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == stack_for("vm1").pidfile.read_text().strip()
    pid = program_pid("host", "mux")  # may be None while the mux keeps failing
    assert pid is None or psutil.pid_exists(pid)
    with pytest.raises(Exception, match="not a lab VM"):
        run_in_vm("host", ["true"])


def _snapshot() -> dict:
    """Everything `lab up` could change, in a form that changes if it did."""
    snap: dict = {"netns": sorted(_netns())}
    for ns in [None, *LAB_NETNS]:
        where = ["-n", ns] if ns else []
        links = subprocess.run(["ip", *where, "-o", "link"], capture_output=True, text=True,
                               check=True).stdout
        snap[f"links {ns}"] = [ln.split("@")[0].split(":")[:2] for ln in links.splitlines()]
        snap[f"addr {ns}"] = subprocess.run(["ip", *where, "-o", "-4", "addr"],
                                            capture_output=True, text=True, check=True).stdout
        snap[f"route {ns}"] = subprocess.run(["ip", *where, "route"], capture_output=True,
                                             text=True, check=True).stdout
    files = [*LAB_ROOT.glob("*/vmbusify.toml"), *ETC_NETNS.glob("vmbl-*/*")]
    snap["files"] = {str(p): (p.read_text(), p.stat().st_mtime_ns) for p in files}
    snap["supervisords"] = {p.parent.parent.name: p.read_text()
                            for p in LAB_ROOT.glob("*/run/supervisord.pid")}
    return snap


def test_up_is_idempotent(lab_up: LabHandle) -> None:
    before = _snapshot()
    vmbusify("lab", "up")
    assert _snapshot() == before


@pytest.fixture
def restore_lab(lab_up: LabHandle):
    """Bring the lab back to the session's state after a test that changes it."""
    yield
    vmbusify("lab", "-q", "up", "--vms", str(len(lab_up.status["vms"])))
    assert lab_up.refresh()["up"]


def _is_descendant(proc: psutil.Process, ancestor: int) -> bool:
    return proc.pid == ancestor or any(p.pid == ancestor for p in proc.parents())


def test_up_repairs_a_half_up_lab(lab_up: LabHandle, restore_lab: None) -> None:
    vm2 = stack_for("vm2")
    os.kill(int(vm2.pidfile.read_text()), signal.SIGKILL)  # its programs are orphaned
    subprocess.run(["ip", "-n", "vmbl-vm1", "link", "delete", "sdn0"], check=True)
    (ETC_NETNS / "vmbl-vm2" / "resolv.conf").unlink()
    assert lab_status()["up"] is False

    vmbusify("lab", "up")
    st = lab_status()
    assert st["up"] is True
    assert _addrs("vmbl-vm1", "sdn0") == ["198.19.1.10/24"]
    assert (ETC_NETNS / "vmbl-vm2" / "resolv.conf").is_file()
    new = st["vms"][1]["supervisord_pid"]
    assert all(_is_descendant(p, new) for p in stack_processes(vm2)), "orphans of vm2 left"


def test_up_adds_and_removes_vms(lab_up: LabHandle, restore_lab: None) -> None:
    vmbusify("lab", "up", "--vms", "3")
    st = lab_status()
    assert [v["vmid"] for v in st["vms"]] == ["vm1", "vm2", "vm3"] and st["up"]
    assert _addrs("vmbl-vm3", "sdn0") == ["198.19.3.10/24"]
    assert [v.vmid for v in load_config(LAB_ROOT / "host" / "vmbusify.toml").vms] == [
        "vm1", "vm2", "vm3"]

    vmbusify("lab", "up", "--vms", "2")
    assert [v["vmid"] for v in lab_status()["vms"]] == ["vm1", "vm2"]
    assert "vmbl-vm3" not in _netns()
    assert not (LAB_ROOT / "vm3").exists() and not (ETC_NETNS / "vmbl-vm3").exists()
    assert stack_processes(stack_for("vm3")) == []


def _lab_processes() -> list[tuple[int, list[str]]]:
    """Processes whose command line or environment mentions the lab root."""
    found = []
    for proc in psutil.process_iter():
        try:
            cmdline = proc.cmdline()
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if any(f"{LAB_ROOT}/" in part for part in [*cmdline, *env.values()]):
            found.append((proc.pid, cmdline))
    return found


def test_down_leaves_nothing_behind(lab_up: LabHandle, restore_lab: None) -> None:
    assert _lab_processes()
    out = vmbusify("lab", "down")
    assert out.stdout.strip() == "lab: down"

    assert not [ns for ns in _netns() if ns.startswith("vmbl-")]
    assert subprocess.run(["ip", "link", "show", "dev", "vmbl-ext0"],
                          check=False, capture_output=True).returncode != 0
    assert not LAB_ROOT.exists()
    assert not list(ETC_NETNS.glob("vmbl-*"))
    supervisords = [p for p in psutil.process_iter(["cmdline"])
                    if "supervisord" in " ".join(p.info["cmdline"] or [])
                    and f"{LAB_ROOT}/" in " ".join(p.info["cmdline"] or [])]
    assert supervisords == []
    assert _lab_processes() == []
    st = lab_status()
    assert st["vms"] == [] and st["up"] is False and st["external"]["present"] is False

    again = vmbusify("lab", "down")
    assert again.returncode == 0 and again.stdout.strip() == "lab: down"
