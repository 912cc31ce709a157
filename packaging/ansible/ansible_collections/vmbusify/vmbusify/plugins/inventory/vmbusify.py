# VMBusify's inventory plugin for Ansible (docs/ansible.md).
"""The VMs of one or more hypervisors, from their ``vmbusifyctl status --json``."""

from __future__ import annotations

DOCUMENTATION = r"""
    name: vmbusify
    short_description: The VMs of one or more VMBusify hypervisors
    description:
        - Asks each hypervisor's VMBusify for its VMs (C(vmbusifyctl status --json), on this
          machine or over ssh) and adds each VM as C(HYPERVISOR/VMID), in a group named
          after its hypervisor, set up to be reached with the C(vmbusify.vmbusify.vmbusify)
          connection. The same vmid on two hypervisors gives two hosts.
        - "Host variables: C(vmbusify_vmid), C(vmbusify_hypervisor), C(vmbusify_state)
          (connected, connecting, backoff, disconnected), C(vmbusify_connected),
          C(vmbusify_ips), C(vmbusify_address), C(vmbusify_rtt_ms), C(vmbusify_hostname),
          C(vmbusify_peer_version), C(vmbusify_last_error), C(vmbusify_source) (config,
          libvirt, firecracker...), C(vmbusify_aliases) (a libvirt domain's UUID)."
        - The inventory file's name must end in C(vmbusify.yml) or C(vmbusify.yaml).
    author: VMBusify
    version_added: "0.2.0"
    extends_documentation_fragment:
        - constructed
    options:
      plugin:
        description: This plugin's name.
        required: true
        choices: [vmbusify.vmbusify.vmbusify]
      hypervisors:
        description:
          - The hypervisors. Each is a mapping with C(name) (the group, and the first part
            of its hosts' names), C(host) (an ssh destination; empty or absent for this
            machine), and optionally C(config) (VMBusify's configuration file there),
            C(vmbusifyctl) and C(vmbusifyexec) (the programs' paths there) and C(ssh_args).
          - The status of this machine is read in-process through VMBusify's Python API
            when Ansible's Python can import it (C(use_api)), else with C(vmbusifyctl).
        type: list
        elements: dict
        required: true
      only_connected:
        description: List only the VMs whose tunnel is up.
        type: bool
        default: false
      use_api:
        description: Read this machine's status through vmbusify.client when importable.
        type: bool
        default: true
      ssh_executable:
        description: The ssh client used to reach remote hypervisors.
        type: str
        default: ssh
      timeout:
        description: Seconds to wait for one hypervisor's status.
        type: int
        default: 30
"""

EXAMPLES = r"""
# fleet.vmbusify.yml
plugin: vmbusify.vmbusify.vmbusify
hypervisors:
  - name: local               # the VMs of this machine
  - name: hv1
    host: root@hv1.example.net
    ssh_args: -i ~/.ssh/fleet
only_connected: true
keyed_groups:
  - key: vmbusify_state
    prefix: state
"""

import json
import re
import shlex
import subprocess
import typing as t

from ansible.errors import AnsibleParserError
from ansible.module_utils.common.text.converters import to_native
from ansible.plugins.inventory import BaseInventoryPlugin, Constructable
from ansible.utils.unsafe_proxy import wrap_var

try:  # VMBusify's Python API, when Ansible runs where VMBusify is installed
    from vmbusify.client import Client
    from vmbusify.errors import VMBusifyError
    HAVE_API = True
except ImportError:
    HAVE_API = False

#: The host variables whose values the guest chose.
GUEST_SAID = ("vmbusify_ips", "vmbusify_hostname", "vmbusify_peer_version",
              "vmbusify_last_error")
#: A hypervisor's name: a group name and the first part of its hosts' names.
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,62}$")


class InventoryModule(BaseInventoryPlugin, Constructable):
    """One host per VM of each hypervisor, grouped by hypervisor."""

    NAME = "vmbusify.vmbusify.vmbusify"

    def verify_file(self, path: str) -> bool:
        """Only files named ``*vmbusify.yml`` or ``*vmbusify.yaml``."""
        return super().verify_file(path) and path.endswith(("vmbusify.yml", "vmbusify.yaml"))

    def parse(self, inventory: t.Any, loader: t.Any, path: str, cache: bool = True) -> None:
        """Ask every hypervisor for its VMs and add them."""
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        hypervisors = self.get_option("hypervisors")
        names: set[str] = set()
        for spec in hypervisors:
            if not isinstance(spec, dict):
                raise AnsibleParserError(f"{path}: each hypervisor must be a mapping")
            name = str(spec.get("name", ""))
            if not NAME.match(name):
                raise AnsibleParserError(f"{path}: hypervisor name {name!r} must be a group "
                                         "name (letters, digits, '_', '.', '-')")
            if name in names:
                raise AnsibleParserError(f"{path}: hypervisor {name!r} is listed twice")
            names.add(name)
        for spec in hypervisors:  # every name checked before any hypervisor is asked
            name = str(spec["name"])
            self._add_hypervisor(name, spec, self._status(name, spec))

    def _status(self, name: str, spec: dict[str, t.Any]) -> dict[str, t.Any]:
        if HAVE_API and not spec.get("host") and self.get_option("use_api"):
            try:
                status = Client(spec.get("config") or None,
                                timeout=self.get_option("timeout")).status().raw
            except (VMBusifyError, OSError) as exc:
                raise AnsibleParserError(f"hypervisor {name}: {to_native(exc)}") from None
            return self._checked(name, status)
        command = [str(spec.get("vmbusifyctl") or "vmbusifyctl")]
        if spec.get("config"):
            command += ["--config", str(spec["config"])]
        command += ["status", "--json"]
        host = str(spec.get("host") or "")
        if host:
            command = [self.get_option("ssh_executable"),
                       *shlex.split(str(spec.get("ssh_args") or "")), "-o", "BatchMode=yes",
                       host, "--", shlex.join(command)]
        try:
            proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                  check=False, timeout=self.get_option("timeout"))
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AnsibleParserError(f"hypervisor {name}: {to_native(exc)}") from None
        if proc.returncode != 0:
            why = to_native(proc.stderr.strip()) or f"status {proc.returncode}"
            raise AnsibleParserError(f"hypervisor {name}: {' '.join(command[:1])} failed: {why}")
        try:
            status = json.loads(proc.stdout)
        except ValueError:
            raise AnsibleParserError(f"hypervisor {name}: the status is not JSON") from None
        return self._checked(name, status)

    @staticmethod
    def _checked(name: str, status: t.Any) -> dict[str, t.Any]:
        if not isinstance(status, dict) or not isinstance(status.get("vms"), list):
            raise AnsibleParserError(f"hypervisor {name}: the status lists no VMs")
        return status

    def _add_hypervisor(self, name: str, spec: dict[str, t.Any],
                        status: dict[str, t.Any]) -> None:
        group = self.inventory.add_group(name)
        strict = self.get_option("strict")
        for vm in status["vms"]:
            vmid = vm.get("vmid") if isinstance(vm, dict) else None
            if not isinstance(vmid, str) or not vmid:
                continue
            state = str(vm.get("state", ""))
            if self.get_option("only_connected") and state != "connected":
                continue
            host = self.inventory.add_host(f"{name}/{vmid}", group=group)
            ips, aliases = vm.get("ips"), vm.get("aliases")
            hostvars = {
                "vmbusify_vmid": vmid,
                "vmbusify_hypervisor": name,
                "vmbusify_state": state,
                "vmbusify_connected": state == "connected",
                "vmbusify_ips": [ip for ip in ips if isinstance(ip, str)]
                if isinstance(ips, list) else [],
                "vmbusify_address": vm.get("address") or "",
                "vmbusify_rtt_ms": vm.get("rtt_ms"),
                "vmbusify_hostname": vm.get("hostname") or "",
                "vmbusify_peer_version": vm.get("peer_version") or "",
                "vmbusify_last_error": vm.get("last_error") or "",
                # Where the host found it (config, libvirt...) and its other names (a
                # libvirt domain's UUID): docs/discovery.md.
                "vmbusify_source": vm.get("source") or "",
                "vmbusify_aliases": [a for a in aliases if isinstance(a, str)]
                if isinstance(aliases, list) else [],
                # How the connection plugin reaches it.
                "ansible_connection": "vmbusify.vmbusify.vmbusify",
                "ansible_vmbusify_vmid": vmid,
                "ansible_vmbusify_hypervisor": str(spec.get("host") or ""),
            }
            if spec.get("config"):
                hostvars["ansible_vmbusify_config"] = str(spec["config"])
            if spec.get("vmbusifyexec"):
                hostvars["ansible_vmbusify_exec"] = str(spec["vmbusifyexec"])
            if spec.get("ssh_args"):
                hostvars["ansible_vmbusify_ssh_args"] = str(spec["ssh_args"])
            # What the guest told its hypervisor (its addresses, host name, version, the
            # text of its errors) may come from a hostile guest: marked unsafe, so Ansible
            # never evaluates a "{{ ... }}" in it as a template on the control node.
            for key in GUEST_SAID:
                hostvars[key] = wrap_var(hostvars[key])
            for key, value in hostvars.items():
                self.inventory.set_variable(host, key, value)
            self._set_composite_vars(self.get_option("compose"), hostvars, host, strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), hostvars, host,
                                              strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), hostvars, host,
                                           strict=strict)
