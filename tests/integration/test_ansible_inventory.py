"""The Ansible inventory plugin (packaging/ansible) against statuses a hypervisor could send,
with a stand-in vmbusifyctl (no root, no lab): names, groups, variables, and a hostile
guest's text never evaluated as a template on the control node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
COLLECTIONS = REPO / "packaging" / "ansible"

#: What the guest controls in a status: its host name, version and error texts.
HOSTILE = "{{ 6 * 7 }}{% raw %}"


def fake_ctl(path: Path, status: dict[str, Any]) -> Path:
    """A vmbusifyctl that prints ``status`` for `status --json`."""
    path.write_text(f"#!{sys.executable}\nimport sys\n"
                    "assert sys.argv[-2:] == ['status', '--json'], sys.argv\n"
                    f"print({json.dumps(json.dumps(status))})\n")
    path.chmod(0o755)
    return path


def vm(vmid: str, state: str = "connected", **extra: Any) -> dict[str, Any]:
    return {"vmid": vmid, "state": state, "ips": ["198.19.1.10"], "rtt_ms": 0.4,
            "address": f"vsock:{len(vmid) + 2}", "hostname": vmid, "last_error": "",
            "peer_version": "0.2.0", "source": "libvirt",
            "aliases": ["6f1c0e0a-5d1b-4c83-9d1e-3f0b8f6c2a11"], **extra}


def ansible(tmp: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    (tmp / "ansible.cfg").write_text("[defaults]\n")
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
           "ANSIBLE_HOME": str(tmp), "ANSIBLE_CONFIG": str(tmp / "ansible.cfg"),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_INVENTORY_UNPARSED_FAILED": "1"}
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], env=env, capture_output=True,
                          text=True, check=False, timeout=120)


def inventory(tmp: Path, hypervisors: list[dict[str, Any]], **options: Any) -> Path:
    path = tmp / "fleet.vmbusify.yml"
    path.write_text(json.dumps({"plugin": "vmbusify.vmbusify.vmbusify",
                                "hypervisors": hypervisors, "use_api": False, **options}))
    return path


def test_hosts_are_named_by_hypervisor_and_grouped(tmp_path: Path) -> None:
    a = fake_ctl(tmp_path / "ctl-a", {"vms": [vm("vm1"), vm("vm2", "backoff")]})
    b = fake_ctl(tmp_path / "ctl-b", {"vms": [vm("vm1"), {"vmid": 7}, "junk"]})
    inv = inventory(tmp_path, [{"name": "hv1", "vmbusifyctl": str(a)},
                               {"name": "hv2", "vmbusifyctl": str(b), "config": "/etc/x.toml"}])
    out = ansible(tmp_path, "ansible-inventory", "-i", str(inv), "--list")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert sorted(doc["hv1"]["hosts"]) == ["hv1/vm1", "hv1/vm2"]
    assert doc["hv2"]["hosts"] == ["hv2/vm1"]  # malformed records are left out
    one, two = doc["_meta"]["hostvars"]["hv1/vm1"], doc["_meta"]["hostvars"]["hv2/vm1"]
    assert one["vmbusify_vmid"] == two["vmbusify_vmid"] == "vm1"
    assert one["vmbusify_connected"] is True
    # What the guest said is marked unsafe (never a template): so --list shows it.
    assert one["vmbusify_ips"] == [{"__ansible_unsafe": "198.19.1.10"}]
    assert doc["_meta"]["hostvars"]["hv1/vm2"]["vmbusify_state"] == "backoff"
    assert one["vmbusify_source"] == "libvirt"
    assert one["vmbusify_aliases"] == ["6f1c0e0a-5d1b-4c83-9d1e-3f0b8f6c2a11"]
    assert two["ansible_vmbusify_config"] == "/etc/x.toml"
    assert "ansible_vmbusify_config" not in one

    only = inventory(tmp_path, [{"name": "hv1", "vmbusifyctl": str(a)}], only_connected=True)
    out = ansible(tmp_path, "ansible-inventory", "-i", str(only), "--list")
    assert json.loads(out.stdout)["hv1"]["hosts"] == ["hv1/vm1"]


def test_a_guests_text_is_never_a_template(tmp_path: Path) -> None:
    ctl = fake_ctl(tmp_path / "ctl", {"vms": [vm("vm1", hostname=HOSTILE,
                                                  last_error=HOSTILE)]})
    inv = inventory(tmp_path, [{"name": "hv1", "vmbusifyctl": str(ctl)}])
    out = ansible(tmp_path, "ansible", "-i", str(inv), "all", "-c", "local", "-m",
                  "ansible.builtin.debug", "-a", "msg={{ vmbusify_hostname }}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert '"msg": "{{ 6 * 7 }}{% raw %}"' in out.stdout, out.stdout


def test_bad_inventories_say_why(tmp_path: Path) -> None:
    failing = tmp_path / "ctl-fail"
    failing.write_text("#!/bin/sh\necho 'vmbusifyctl: no command listener' >&2\nexit 1\n")
    failing.chmod(0o755)
    garbage = tmp_path / "ctl-garbage"
    garbage.write_text("#!/bin/sh\necho not json\n")
    garbage.chmod(0o755)
    for hypervisors, reason in (
            ([{"name": "hv1", "vmbusifyctl": str(failing)}], "no command listener"),
            ([{"name": "hv1", "vmbusifyctl": str(garbage)}], "the status is not JSON"),
            ([{"name": "bad/name", "vmbusifyctl": str(garbage)}], "must be a group name"),
            ([{"name": "hv1", "vmbusifyctl": str(failing)}] * 2, "listed twice")):
        out = ansible(tmp_path, "ansible-inventory", "-i",
                      str(inventory(tmp_path, hypervisors)), "--list")
        assert out.returncode != 0 and reason in " ".join(out.stderr.split()), out.stderr
        assert "Traceback" not in out.stderr
