"""Ansible over VMBusify (packaging/ansible, docs/ansible.md), with ansible-core from PyPI
against the lab's VMs: the inventory plugin lists them, and a playbook copies a file,
templates another, runs a command, becomes another user, fetches a file and gathers facts,
through the connection plugin, both on this machine as the hypervisor and on a "remote"
hypervisor reached by ssh (an sshd on 127.0.0.1 with keys the test makes)."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.exec import LocalSshd
from vmbusify.client import Client
from vmbusify.lab.layout import SUBNET_CIDR, SUBNET_CIDR6
from vmbusify.lab.testing import LabHandle

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
COLLECTIONS = REPO / "packaging" / "ansible"
PLAYBOOK = Path(__file__).resolve().parent / "ansible" / "site.yml"


@pytest.fixture(scope="module")
def sshd() -> Iterator[LocalSshd]:
    """A throwaway sshd on 127.0.0.1: the remote hypervisor's way in."""
    root = Path(tempfile.mkdtemp(prefix="vmbusify-ansible-sshd-"))
    server = LocalSshd(root)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def control_dir() -> Iterator[Path]:
    """Where the connection keeps its ssh master's socket (short: sockets' paths are)."""
    path = Path(tempfile.mkdtemp(prefix="vba-"))
    yield path
    for sock in path.glob("vmbusify-*"):  # stop the master the plays left behind
        subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
                       capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


def ssh_args(sshd: LocalSshd) -> str:
    return (f"-F /dev/null -p {sshd.port} -i {sshd.key} -o StrictHostKeyChecking=no "
            "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")


def write_inventory(path: Path, lab: LabHandle, sshd: LocalSshd) -> Path:
    """Three hypervisors that are all the lab's host: ``here`` (this machine, commands
    in-process through vmbusify.client), ``exe`` (this machine, through vmbusifyexec) and
    ``hv1`` (through the sshd); ``hv1``'s hosts use pipelining, the others do not
    (modules go by put_file)."""
    config = str(lab.layout.host.config_path)
    common = {"config": config, "vmbusifyctl": str(BIN / "vmbusifyctl"),
              "vmbusifyexec": str(BIN / "vmbusifyexec")}
    doc = {"plugin": "vmbusify.vmbusify.vmbusify",
           "hypervisors": [{"name": "here", **common}, {"name": "exe", **common},
                           {"name": "hv1", "host": f"{sshd.user}@127.0.0.1",
                            "ssh_args": ssh_args(sshd), **common}],
           "compose": {"ansible_pipelining": "vmbusify_hypervisor == 'hv1'",
                       "ansible_vmbusify_use_api": "vmbusify_hypervisor == 'here'"},
           "keyed_groups": [{"key": "vmbusify_state", "prefix": "state"}]}
    inventory = path / "lab.vmbusify.yml"
    inventory.write_text(json.dumps(doc))  # JSON is YAML
    return inventory


def ansible_env(home: Path) -> dict[str, str]:
    """Ansible's environment: this collection, its files under ``home``, no user config."""
    (home / "ansible.cfg").write_text("[defaults]\n")
    return {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
            "ANSIBLE_HOME": str(home), "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
            "ANSIBLE_PYTHON_INTERPRETER": "auto_silent", "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "0", "ANSIBLE_CONFIG": str(home / "ansible.cfg"),
            "ANSIBLE_FORKS": "4"}


def run_playbook(inventory: Path, extra: dict[str, object], playbook: Path, home: Path,
                 timeout: float) -> subprocess.CompletedProcess[str]:
    """``ansible-playbook`` with ``extra`` vars; asserts that it succeeded (output shown)."""
    out = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory),
                          "-e", json.dumps(extra), str(playbook)],
                         env=ansible_env(home), capture_output=True, text=True,
                         check=False, timeout=timeout)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    return out


def test_inventory_lists_each_hypervisors_vms(lab: LabHandle, sshd: LocalSshd,
                                              tmp_path: Path) -> None:
    inventory = write_inventory(tmp_path, lab, sshd)
    out = subprocess.run([str(BIN / "ansible-inventory"), "-i", str(inventory), "--list"],
                         env=ansible_env(tmp_path), capture_output=True, text=True,
                         check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert sorted(doc["here"]["hosts"]) == ["here/vm1", "here/vm2"]
    assert sorted(doc["hv1"]["hosts"]) == ["hv1/vm1", "hv1/vm2"]
    assert {"here/vm1", "hv1/vm1"} <= set(doc["state_connected"]["hosts"])
    here, remote = doc["_meta"]["hostvars"]["here/vm1"], doc["_meta"]["hostvars"]["hv1/vm1"]
    assert here["vmbusify_vmid"] == remote["vmbusify_vmid"] == "vm1"
    assert here["vmbusify_state"] == "connected" and here["vmbusify_connected"] is True
    # The guest's addresses, marked unsafe (a guest's text is never a template).
    assert {"__ansible_unsafe": lab.layout.vm("vm1").sdn_ip} in here["vmbusify_ips"]
    assert here["ansible_vmbusify_hypervisor"] == ""
    assert remote["ansible_vmbusify_hypervisor"] == f"{sshd.user}@127.0.0.1"
    assert (here["ansible_pipelining"], remote["ansible_pipelining"]) == (False, True)


def test_inventory_names_an_unreachable_hypervisor(tmp_path: Path) -> None:
    inventory = tmp_path / "bad.vmbusify.yml"
    inventory.write_text(json.dumps({"plugin": "vmbusify.vmbusify.vmbusify", "hypervisors": [
        {"name": "gone", "config": str(tmp_path / "none.toml"),
         "vmbusifyctl": str(BIN / "vmbusifyctl")}]}))
    out = subprocess.run([str(BIN / "ansible-inventory"), "-i", str(inventory), "--list"],
                         env={**ansible_env(tmp_path), "ANSIBLE_INVENTORY_UNPARSED_FAILED": "1"},
                         capture_output=True, text=True, check=False, timeout=120)
    assert out.returncode != 0
    assert "hypervisor gone" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_playbook_through_local_and_remote_hypervisors(lab: LabHandle, sshd: LocalSshd,
                                                       control_dir: Path,
                                                       tmp_path: Path) -> None:
    inventory = write_inventory(tmp_path, lab, sshd)
    marker = uuid.uuid4().hex
    workdir = f"/tmp/vmbusify-ansible-{marker}"
    outdir = tmp_path / "fetched"
    # The lab's VMs share the host's file system (network namespaces): a directory each.
    extra = {"workdir": f"{workdir}/{{{{ inventory_hostname }}}}", "outdir": str(outdir),
             "marker": marker, "ansible_vmbusify_control_dir": str(control_dir),
             "ansible_vmbusify_control_persist": 30}
    sessions_before = (sshd.root / "sshd.log").read_text().count("Accepted publickey")
    client = Client(lab.layout.host.config_path)
    # The template writes the addresses the inventory sees: let a lab that has just come up
    # report its virtual subnet's addresses first (they follow the connection by a moment).
    wait_for_subnet_addresses(client, ["vm1", "vm2"])
    try:
        out = run_playbook(inventory, extra, PLAYBOOK, tmp_path, 600)
        recap = re.findall(r"^(\S+)\s+: ok=\d+\s+changed=\d+\s+unreachable=0\s+failed=0",
                           out.stdout, re.MULTILINE)
        assert sorted(recap) == ["exe/vm1", "exe/vm2", "here/vm1", "here/vm2", "hv1/vm1",
                                 "hv1/vm2"], out.stdout
        for hv in ("here", "exe", "hv1"):
            for vmid in ("vm1", "vm2"):
                report = (outdir / f"{hv}-{vmid}.txt").read_text()
                # The command ran in the VM: its network namespace's address, not the host's.
                assert f"inet {lab.layout.vm(vmid).sdn_ip}/" in report, report
                assert "whoami=nobody\n" in report, report
                facts = re.search(r"^ipv4=(.*)$", report, re.MULTILINE)  # gathered in the VM
                assert facts and lab.layout.vm(vmid).sdn_ip in facts[1].split(","), report
                files = client.run(vmid, ["cat", f"{workdir}/{hv}/{vmid}/copied.txt",
                                          f"{workdir}/{hv}/{vmid}/templated.txt"], check=True)
                assert files.stdout.decode().splitlines() == [
                    marker, f"{vmid} on {hv} ({','.join(lab_ips(client, vmid))}): {marker}"]
        # hv1's commands went through the sshd: one master connection, not one per command.
        accepted = (sshd.root / "sshd.log").read_text().count("Accepted publickey")
        assert 1 <= accepted - sessions_before <= 3, accepted - sessions_before
    finally:
        for vmid in ("vm1", "vm2"):
            client.run(vmid, ["rm", "-rf", workdir])


def wait_for_subnet_addresses(client: Client, vmids: list[str], timeout: float = 60) -> None:
    """Until each VM reports an address in the lab's virtual subnet (IPv4 and IPv6)."""
    nets = [ipaddress.ip_network(SUBNET_CIDR), ipaddress.ip_network(SUBNET_CIDR6)]
    deadline = time.monotonic() + timeout
    while True:
        missing = [vmid for vmid in vmids
                   if not all(any(ipaddress.ip_address(ip) in net for ip in lab_ips(client, vmid))
                              for net in nets)]
        if not missing:
            return
        assert time.monotonic() < deadline, f"no subnet addresses reported by {missing}"
        time.sleep(0.2)


def lab_ips(client: Client, vmid: str) -> list[str]:
    return client.status().vm(vmid).ips


def test_an_unknown_vm_is_unreachable_not_failed(lab: LabHandle, tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(
        "[vms]\nnosuch ansible_connection=vmbusify.vmbusify.vmbusify "
        f"ansible_vmbusify_config={lab.layout.host.config_path} "
        f"ansible_vmbusify_exec={BIN / 'vmbusifyexec'}\n")
    out = subprocess.run([str(BIN / "ansible"), "-i", str(inventory), "vms", "-m", "ping"],
                         env=ansible_env(tmp_path), capture_output=True, text=True,
                         check=False, timeout=120)
    assert out.returncode == 4, out.stdout + out.stderr  # 4: a host was unreachable
    assert "UNREACHABLE" in out.stdout and "nosuch" in out.stdout, out.stdout


def test_reset_connection_starts_a_new_master(lab: LabHandle, sshd: LocalSshd,
                                              tmp_path: Path) -> None:
    """``meta: reset_connection``: the commands after it still run in the VM, and the remote
    hypervisor's are through a new ssh master (the old one stopped taking commands)."""
    inventory = write_inventory(tmp_path, lab, sshd)
    control = Path(tempfile.mkdtemp(prefix="vbr-"))
    playbook = tmp_path / "reset.yml"
    playbook.write_text(
        "- hosts: 'hv1/vm1,here/vm1'\n  gather_facts: false\n  tasks:\n"
        "    - raw: echo before\n"
        "    - meta: reset_connection\n"
        "    - raw: ip -4 -o addr show\n      register: after\n"
        "    - debug: var=after.stdout_lines\n")
    extra = {"ansible_vmbusify_control_dir": str(control),
             "ansible_vmbusify_control_persist": 30}
    sessions_before = (sshd.root / "sshd.log").read_text().count("Accepted publickey")
    try:
        out = run_playbook(inventory, extra, playbook, tmp_path, 300)
        assert "not implemented" not in out.stdout + out.stderr
        assert out.stdout.count(f"inet {lab.layout.vm('vm1').sdn_ip}/") == 2, out.stdout
        # The inventory's status (a plain ssh), one master before the reset, a new one after.
        accepted = (sshd.root / "sshd.log").read_text().count("Accepted publickey")
        assert accepted - sessions_before == 3, accepted - sessions_before
    finally:
        for sock in control.glob("vmbusify-*"):
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
                           capture_output=True, check=False)
        shutil.rmtree(control, ignore_errors=True)
