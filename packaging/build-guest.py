#!/usr/bin/env python3
"""Build the guest's Debian package from this checkout: a .deb that installs with no network
on a Debian machine that has Debian's own python3, python3-zmq, python3-msgpack,
python3-psutil, python3-click and supervisor (apt pulls them from the image's mirror or
a local repository; dpkg -i needs them there already).

    packaging/build-guest.py [--out DIR] [--source CHECKOUT] [--force]

It prints the path of the package on its last line, and leaves a symlink
``DIR/vmbusify-guest.deb`` to it. The version is pyproject's plus a hash of everything that
goes in (``0.1.0+src1a2b3c4d5e``): the same checkout gives the same file name, which is
reused (built once, then found in seconds) unless --force. The default DIR,
/var/cache/vmbusify-lab/deb, is outside the checkout and needs root; give --out otherwise.

What the package holds (docs/deploy.md, "Installing either end"):

- the ``vmbusify`` Python package in /usr/lib/python3/dist-packages (with its dist-info, so
  ``vmbusify --version`` works), and /usr/bin/vmbusify, vmbusifyctl, vmbusifyexec, with their
  man pages (made from their help by ``vmbusify man``) in /usr/share/man/man1;
- /etc/vmbusify: supervisord.conf, programs/*.conf (each sending its output to the journal
  too: ``journalctl -u vmbusify-guest`` shows supervisord, the mux and every worker), and
  vmbusify.toml from packaging/guest.toml (0600 in a 0700 directory); all are conffiles;
- /usr/lib/systemd/system/vmbusify-guest.service: packaging/vmbusify-guest.service with
  Debian's paths (/usr/bin/supervisord, VMBUSIFY_BIN=/usr/bin); the first install enables it
  (a plain symlink, so it works while an image is built with no systemd running) and starts
  it only where systemd runs and policy-rc.d allows.

Depends comes from pyproject's dependencies (each mapped to its Debian package, with the same
floor); the host-only extras (aiohttp, uvloop) are only Suggested: without them the guest
runs, and says in one log line what it does without. Needs python3 (3.11+) and dpkg-deb.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

PACKAGE = "vmbusify-guest"
UNIT = "vmbusify-guest.service"
DEFAULT_OUT = Path("/var/cache/vmbusify-lab/deb")
SITE = "usr/lib/python3/dist-packages"
UNIT_DIR = "usr/lib/systemd/system"
DOC_DIR = f"usr/share/doc/{PACKAGE}"
MAN_DIR = "usr/share/man/man1"

#: pyproject dependency -> the Debian package that provides it. A new dependency must be
#: added here (and be in Debian), or the guest could not install it with no network.
DEBIAN_NAMES = {
    "psutil": "python3-psutil",
    "pyzmq": "python3-zmq",
    "msgpack": "python3-msgpack",
    "supervisor": "supervisor",
    "click": "python3-click",
    "aiohttp": "python3-aiohttp",
    "uvloop": "python3-uvloop",
    "prometheus-client": "python3-prometheus-client",
}

#: What install.sh appends to every program too (packaging/install.sh, step 3).
JOURNAL_LINES = "; VMBusify packaging: under systemd, to the journal too\nstdout_syslog=true\n"

#: packaging/vmbusify-guest.service is install.sh's (a venv in /opt/vmbusify): these turn
#: it into the package's. Each must be found, so a change to the unit cannot slip past.
UNIT_EDITS = [
    ("/opt/vmbusify/venv/bin/supervisord", "/usr/bin/supervisord"),
    ("VMBUSIFY_BIN=/opt/vmbusify/venv/bin", "VMBUSIFY_BIN=/usr/bin"),
    ("file:///opt/vmbusify/docs/deploy.md", f"file:///{DOC_DIR}/deploy.md"),
    ("# Installed by packaging/install.sh guest.",
     f"# Installed by the {PACKAGE} Debian package (packaging/build-guest.py)."),
]

CONSOLE_SCRIPT = """#!/usr/bin/python3
# {name}: installed by the {package} Debian package (packaging/build-guest.py).
import sys

from {module} import {func}

sys.exit({func}())
"""

POSTINST = r"""#!/bin/sh
# vmbusify-guest postinst: byte-compile, make the state directory, enable the unit once.
set -e
site=/usr/lib/python3/dist-packages
unit=vmbusify-guest.service
if [ "$1" = configure ]; then
    # Every vmbusifyexec start would compile its modules again otherwise.
    python3 -m compileall -q "$site/vmbusify" >/dev/null || true
    # The unit's StateDirectory= makes it too; outside systemd nothing would.
    install -d -m 0700 /var/lib/vmbusify
    # Every problem of the config, one a line (vmbusify check-config), before the unit runs.
    if ! /usr/bin/vmbusify check-config -q /etc/vmbusify/vmbusify.toml; then
        echo "vmbusify-guest: fix /etc/vmbusify/vmbusify.toml before starting $unit" >&2
    fi
    if [ -z "$2" ]; then
        # First install: enable (a plain symlink: an image build has no systemd running).
        mkdir -p /etc/systemd/system/multi-user.target.wants
        ln -sf /usr/lib/systemd/system/$unit /etc/systemd/system/multi-user.target.wants/$unit
        if [ -d /run/systemd/system ]; then
            systemctl daemon-reload || true
            if command -v deb-systemd-invoke >/dev/null 2>&1; then
                deb-systemd-invoke start "$unit" || true
            fi
        fi
    elif [ -d /run/systemd/system ]; then
        # Not restarted here: an upgrade may run through vmbusifyexec, which a restart kills.
        systemctl daemon-reload || true
        echo "vmbusify-guest: upgraded; systemctl restart $unit runs the new version"
    fi
fi
exit 0
"""

PRERM = r"""#!/bin/sh
# vmbusify-guest prerm: stop the unit on removal; drop the byte-code postinst made.
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop vmbusify-guest.service || true
fi
find /usr/lib/python3/dist-packages/vmbusify -name __pycache__ -type d -prune \
    -exec rm -rf {} + 2>/dev/null || true
exit 0
"""

POSTRM = r"""#!/bin/sh
# vmbusify-guest postrm: forget the enablement; on purge, the state too (control token).
set -e
unit=vmbusify-guest.service
case "$1" in
    remove|purge)
        rm -f /etc/systemd/system/multi-user.target.wants/$unit
        [ ! -d /run/systemd/system ] || systemctl daemon-reload || true
        ;;
esac
if [ "$1" = purge ]; then
    rm -rf /var/lib/vmbusify
fi
exit 0
"""


class BuildError(Exception):
    """The checkout cannot be packaged (a missing file, a dependency Debian lacks...)."""


def debian_relations(requirements: list[str]) -> list[str]:
    """``["pyzmq>=24", ...]`` -> ``["python3-zmq (>= 24)", ...]``."""
    out = []
    for req in requirements:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?\s*", req)
        if not m:
            raise BuildError(f"pyproject dependency {req!r}: only NAME or NAME>=VERSION "
                             "can be said in Debian's terms here")
        name, floor = m.group(1).lower(), m.group(2)
        if name not in DEBIAN_NAMES:
            raise BuildError(f"pyproject dependency {name!r} has no Debian package in "
                             "packaging/build-guest.py's DEBIAN_NAMES: a guest could not "
                             "install it with no network")
        out.append(f"{DEBIAN_NAMES[name]} (>= {floor})" if floor else DEBIAN_NAMES[name])
    return out


def python_floor(requires_python: str) -> str:
    """The Depends entry for ``requires-python`` (only ``>=X.Y`` is understood)."""
    m = re.fullmatch(r"\s*>=\s*([0-9.]+)\s*", requires_python)
    if not m:
        raise BuildError(f"requires-python {requires_python!r}: expected >=X.Y")
    return f"python3 (>= {m.group(1)})"


def package_files(source: Path) -> list[Path]:
    """Every file of the vmbusify package (not byte-code), relative to ``source``."""
    files = []
    for path in sorted((source / "vmbusify").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files.append(path.relative_to(source))
    return files


def script_files(source: Path) -> list[Path]:
    """pyproject's script files (``[tool.setuptools] script-files``: vmbusifyexec, whose
    start is its latency, is one instead of a console script), relative to ``source``."""
    tool = tomllib.loads((source / "pyproject.toml").read_text()).get("tool", {})
    return [Path(p) for p in tool.get("setuptools", {}).get("script-files", [])]


def inputs(source: Path) -> list[Path]:
    """Everything the package is made from, relative to ``source``."""
    fixed = [Path("pyproject.toml"), Path("README.md"), Path("docs/deploy.md"),
             Path("conf/supervisord.conf"), Path("packaging/guest.toml"),
             Path("packaging") / UNIT, Path("packaging/build-guest.py"),
             *script_files(source)]
    programs = sorted(p.relative_to(source) for p in (source / "conf/programs").glob("*.conf"))
    if not programs:
        raise BuildError(f"no conf/programs/*.conf in {source}")
    for rel in fixed:
        if not (source / rel).is_file():
            raise BuildError(f"missing {source / rel} (is --source a VMBusify checkout?)")
    return fixed + programs + package_files(source)


def content_hash(source: Path, files: list[Path]) -> str:
    """sha256 over the names and bytes of ``files``: the package's version suffix and cache key."""
    h = hashlib.sha256()
    for rel in files:
        h.update(str(rel).encode() + b"\0")
        h.update((source / rel).read_bytes() + b"\0")
    return h.hexdigest()


def unit_text(source: Path) -> str:
    """The guest's systemd unit: packaging/'s, with the paths the .deb installs to."""
    text = (source / "packaging" / UNIT).read_text()
    for old, new in UNIT_EDITS:
        if old not in text:
            raise BuildError(f"packaging/{UNIT} no longer has {old!r}: update UNIT_EDITS")
        text = text.replace(old, new)
    return text


def man_pages(source: Path) -> dict[str, bytes]:
    """The man pages of the package's commands, made by the checkout's own ``vmbusify man``
    (from the CLIs' help: vmbusify/cli/manpages.py) with this Python, which has click."""
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [sys.executable, "-c", "from vmbusify.cli.main import main; main()", "man",
             "--output", tmp], cwd=source, env={**os.environ, "PYTHONPATH": str(source)},
            capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BuildError(f"making the man pages failed: {done.stderr.strip()[-500:]}")
        pages = {p.name: p.read_bytes() for p in sorted(Path(tmp).glob("*.1"))}
    if not pages:
        raise BuildError("vmbusify man made no page")
    return pages


def write(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    """Write ``text`` at ``path`` (parents made) with ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    path.chmod(mode)


def stage(source: Path, root: Path, project: dict, deb_version: str) -> None:
    """Lay out the package's files under ``root`` (DEBIAN/ included)."""
    version = project["version"]
    site = root / SITE
    for rel in package_files(source):
        write(site / rel, (source / rel).read_bytes())
    info = site / f"vmbusify-{version}.dist-info"
    requires = "".join(f"Requires-Dist: {r}\n" for r in project.get("dependencies", []))
    write(info / "METADATA", f"Metadata-Version: 2.1\nName: vmbusify\nVersion: {version}\n"
          f"Summary: {project.get('description', '')}\n"
          f"Requires-Python: {project.get('requires-python', '')}\n{requires}")
    scripts = project.get("scripts", {})
    write(info / "entry_points.txt", "[console_scripts]\n" + "".join(
        f"{name} = {target}\n" for name, target in sorted(scripts.items())))
    write(info / "top_level.txt", "vmbusify\n")
    write(info / "INSTALLER", "dpkg\n")
    for name, target in sorted(scripts.items()):
        module, _, func = target.partition(":")
        write(root / "usr/bin" / name, CONSOLE_SCRIPT.format(
            name=name, package=PACKAGE, module=module, func=func), 0o755)
    for rel in script_files(source):
        # "#!python" made Debian's interpreter, as pip makes it the venv's
        text = (source / rel).read_text()
        if not text.startswith("#!python\n"):
            raise BuildError(f"{rel}: a script file must start with #!python")
        write(root / "usr/bin" / rel.name, "#!/usr/bin/python3\n" + text[len("#!python\n"):],
              0o755)

    etc = root / "etc/vmbusify"
    write(etc / "supervisord.conf", (source / "conf/supervisord.conf").read_bytes())
    for program in sorted((source / "conf/programs").glob("*.conf")):
        text = program.read_text()
        write(etc / "programs" / program.name,
              text + ("" if text.endswith("\n") else "\n") + JOURNAL_LINES)
    write(etc / "vmbusify.toml", (source / "packaging/guest.toml").read_bytes(), 0o600)
    etc.chmod(0o700)
    conffiles = sorted("/" + str(p.relative_to(root)) for p in etc.rglob("*") if p.is_file())

    for name, page in man_pages(source).items():
        write(root / MAN_DIR / f"{name}.gz", gzip.compress(page, mtime=0))

    write(root / UNIT_DIR / UNIT, unit_text(source))
    write(root / DOC_DIR / "deploy.md", (source / "docs/deploy.md").read_bytes())
    write(root / DOC_DIR / "README.md", (source / "README.md").read_bytes())
    write(root / DOC_DIR / "copyright",
          f"VMBusify\nLicense: {project.get('license', {}).get('text', 'see the source')}\n")

    depends = [python_floor(project.get("requires-python", ">=3.11"))]
    depends += debian_relations(project.get("dependencies", []))
    suggests = debian_relations(project.get("optional-dependencies", {}).get("host", []))
    size_kib = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) // 1024 + 1
    control = (
        f"Package: {PACKAGE}\nVersion: {deb_version}\nArchitecture: all\n"
        "Maintainer: VMBusify developers <vmbusify@localhost>\n"
        f"Installed-Size: {size_kib}\nSection: admin\nPriority: optional\n"
        f"Depends: {', '.join(depends)}\n"
        + (f"Suggests: {', '.join(suggests)}\n" if suggests else "")
        + "Description: VMBusify guest end: exec, proxy and subnet over the hypervisor channel\n"
        " The guest end of VMBusify (tunnel-mux, exec, proxy and subnet workers under\n"
        " supervisord, as the systemd unit vmbusify-guest). Installs with no network:\n"
        " everything it needs is in Debian. Without aiohttp 3.9+ (Suggests) it runs no\n"
        " command listener inside the guest; the host's exec, proxy and subnet still work.\n")
    write(root / "DEBIAN/control", control)
    write(root / "DEBIAN/conffiles", "".join(f"{c}\n" for c in conffiles))
    write(root / "DEBIAN/postinst", POSTINST, 0o755)
    write(root / "DEBIAN/prerm", PRERM, 0o755)
    write(root / "DEBIAN/postrm", POSTRM, 0o755)
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        d.chmod(0o700 if d == etc else 0o755)  # /etc/vmbusify is root's alone, as install.sh


def build(source: Path, out: Path, force: bool = False) -> Path:
    """Build (or find, when its inputs are unchanged) the package; returns its path."""
    project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    digest = content_hash(source, inputs(source))
    deb_version = f"{project['version']}+src{digest[:10]}"
    deb = out / f"{PACKAGE}_{deb_version}_all.deb"
    if force or not deb.is_file():
        if shutil.which("dpkg-deb") is None:
            raise BuildError("dpkg-deb not found (apt-get install dpkg)")
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="build-guest.", dir=out) as tmp:
            root = Path(tmp) / "root"
            root.mkdir()
            stage(source, root, project, deb_version)
            partial = Path(tmp) / deb.name
            done = subprocess.run(
                ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(partial)],
                capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise BuildError(f"dpkg-deb failed: {done.stderr.strip() or done.stdout}")
            partial.chmod(0o644)
            os.replace(partial, deb)
    link = out / f"{PACKAGE}.deb"
    tmp_link = out / f".{PACKAGE}.deb.{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(deb.name)
    os.replace(tmp_link, link)
    return deb


def main(argv: list[str] | None = None) -> int:
    """Build the .deb (or find it in the cache) and print its path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where the .deb goes (default {DEFAULT_OUT})")
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the VMBusify checkout (default: the one this script is in)")
    parser.add_argument("--force", action="store_true", help="build even if it exists")
    args = parser.parse_args(argv)
    try:
        deb = build(args.source.resolve(), args.out, args.force)
    except (BuildError, OSError) as exc:
        print(f"build-guest: {exc}", file=sys.stderr)
        return 1
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
