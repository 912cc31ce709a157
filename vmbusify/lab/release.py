"""A lab VM running an older release's guest stack: that release's tree, exported from git.

Guests are upgraded last, so a host must serve guests of the previous release; the lab proves
it by running one VM's whole guest stack (mux, control, exec, proxy, subnet under its own
supervisord, with that release's ``conf/``) against this checkout's host stack::

    vmbusify lab up --guest-release vm2=v0.1.0     # vm2 runs v0.1.0, the rest this checkout
    vmbusify lab up --guest-release vm2=current    # back to this checkout

The release's ``vmbusify/``, ``conf/`` and ``pyproject.toml`` are exported (``git archive REF``,
or where this clone lacks the tag, as CI's does, the copy of that archive the repository ships
in ``packaging/releases/REF.tar.xz``) into ``<lab root>/releases/REF/tree``;
``releases/REF/bin/`` holds its console scripts (``vmbusify``, ``vmbusifyctl``, ...), which run
that tree with this venv's interpreter and packages (a release's dependencies are the ones
installed here). The VM's supervisord gets that directory as ``VMBUSIFY_BIN``, and commands run
in the VM find them first on ``PATH``. Which release a VM runs is kept in ``vmK/release``, so a
later ``lab up`` keeps it, as it keeps the number of VMs.

Nothing here starts a process but ``git``, ``tar`` and the release's own config check.
"""

from __future__ import annotations

import io
import logging
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import vmbusify.lab.netns as ip
from vmbusify.errors import LabError
from vmbusify.lab.layout import LabLayout, VMLayout, repo_root, venv_bin

log = logging.getLogger(__name__)

#: What ``--guest-release VMID=current`` names: this checkout (no release tree).
CURRENT = "current"
#: The parts of a release a guest stack needs (tests, docs and packaging stay in git).
EXPORTED = ("vmbusify", "conf", "pyproject.toml")
#: Written beside the commit: a tree exported by an older lab (other scripts) is exported again.
_EXPORT_FORMAT = "scripts-1"
#: ``module:function`` of a console script.
_ENTRY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

#: The release's own config loader, run on a candidate file: the message of its ConfigError
#: on stdout and exit 1 when it refuses it. ``-P``: the working directory is never on the path.
_CHECK_CONFIG = """\
import sys
from vmbusify.config import load_config
from vmbusify.errors import VMBusifyError
try:
    load_config(sys.argv[1])
except VMBusifyError as exc:
    print(exc)
    sys.exit(1)
"""


@dataclass(frozen=True)
class ReleaseTree:
    """An exported release: its source tree and the bin directory that runs it."""

    ref: str
    dir: Path

    @property
    def tree(self) -> Path:
        """The release's ``vmbusify/`` and ``conf/``, as ``git archive`` gives them."""
        return self.dir / "tree"

    @property
    def bin_dir(self) -> Path:
        """``VMBUSIFY_BIN`` for a stack of this release (holds ``vmbusify``)."""
        return self.dir / "bin"

    @property
    def commit_file(self) -> Path:
        """The commit the tree was exported from, and how (written last: a tree without it
        is partial)."""
        return self.dir / "commit"

    @property
    def conf(self) -> Path:
        """The release's own ``conf/supervisord.conf``."""
        return self.tree / "conf" / "supervisord.conf"

    def env(self) -> dict[str, str]:
        """Environment for running this release's Python code (on top of the caller's)."""
        return {"PYTHONPATH": str(self.tree)}


def tree_for(ref: str, layout: LabLayout) -> ReleaseTree:
    """Where release ``ref`` is (or would be) exported; nothing is checked or made."""
    return ReleaseTree(ref, layout.release_dir(ref))


def release_of(vm: VMLayout) -> str | None:
    """The release VM ``vm``'s guest stack runs, None for this checkout."""
    try:
        ref = vm.release_path.read_text().strip()
    except FileNotFoundError:
        return None
    return ref or None


def set_release(vm: VMLayout, ref: str | None) -> None:
    """Record that ``vm`` runs release ``ref`` (None: this checkout)."""
    if ref is None:
        vm.release_path.unlink(missing_ok=True)
    elif release_of(vm) != ref:
        vm.release_path.write_text(ref + "\n")


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return ip.run(["git", "-C", str(repo_root()), *args], check=False)


def shipped_archive(ref: str) -> Path:
    """Where this repository ships release ``ref``'s exported parts (``git archive`` of its
    tag, xz-compressed): a clone without tags (CI's, a shallow one) still has them."""
    return repo_root() / "packaging" / "releases" / f"{ref}.tar.xz"


def _git_commit(ref: str) -> str | None:
    proc = _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def _shipped(ref: str) -> tuple[str, bytes] | None:
    """(commit, tar bytes) of the shipped archive of ``ref``, None when none is shipped."""
    path = shipped_archive(ref)
    if not re.fullmatch(r"v\d+(\.\d+)*", ref) or not path.is_file():
        return None
    try:
        data = lzma.decompress(path.read_bytes())
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            commit = tar.pax_headers.get("comment", "")  # git archive's commit id
    except (OSError, lzma.LZMAError, tarfile.TarError) as exc:
        raise LabError(f"release {ref}: cannot read {path}: {exc}") from None
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise LabError(f"release {ref}: {path} names no commit (not made by git archive)")
    return commit, data


def commit_of(ref: str) -> str:
    """The commit ``ref`` names (in this checkout's git, else in the archive shipped for it);
    LabError when neither has it."""
    commit = _git_commit(ref)
    if commit is not None:
        return commit
    shipped = _shipped(ref)
    if shipped is not None:
        return shipped[0]
    shallow = _git("rev-parse", "--is-shallow-repository").stdout.strip() == "true"
    hint = (" (this is a shallow clone: `git fetch --unshallow --tags`)" if shallow
            else " (`git fetch --tags` if it is a tag of the upstream repository)")
    raise LabError(f"release {ref!r} is neither in {repo_root()} nor shipped in "
                   f"{shipped_archive(ref).parent}{hint}")


def release_tar(ref: str) -> tuple[str, bytes]:
    """(commit, a tar of ``EXPORTED`` as release ``ref`` has them): from git where this
    checkout has the ref, else from the shipped archive; LabError when neither has it."""
    commit = _git_commit(ref)
    if commit is None:
        shipped = _shipped(ref)
        if shipped is not None:
            return shipped
        commit_of(ref)  # raises, with the hint
    archive = subprocess.run(["git", "-C", str(repo_root()), "archive", "--format=tar",
                              str(commit), *EXPORTED], capture_output=True, check=False,
                             timeout=60)
    if archive.returncode != 0:
        raise LabError(f"git archive {ref} failed: "
                       f"{archive.stderr.decode(errors='replace').strip()}")
    return str(commit), archive.stdout


def release_file(ref: str, path: str) -> bytes:
    """One file of release ``ref`` (``path`` under one of ``EXPORTED``); LabError if absent."""
    _commit, data = release_tar(ref)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        try:
            member = tar.extractfile(path)
        except KeyError:
            member = None
        if member is None:
            raise LabError(f"release {ref} has no file {path}")
        return member.read()


def export(ref: str, layout: LabLayout) -> tuple[ReleaseTree, bool]:
    """Release ``ref``'s tree and bin directory, exported unless already there from the same
    commit; (the tree, whether it was exported now)."""
    release = tree_for(ref, layout)
    commit = commit_of(ref)
    stamp = f"{commit} {_EXPORT_FORMAT}"
    try:
        if release.commit_file.read_text().strip() == stamp:
            return release, False
    except FileNotFoundError:
        pass
    log.info("exporting release %s (%s) to %s", ref, commit[:12], release.dir)
    release.dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.rmtree(release.dir, ignore_errors=True)
    release.tree.mkdir(parents=True, mode=0o700)
    _commit, tar = release_tar(ref)
    untar = subprocess.run(["tar", "-x", "-C", str(release.tree)], input=tar,
                           capture_output=True, check=False, timeout=60)
    if untar.returncode != 0:
        raise LabError(f"unpacking release {ref} failed: "
                       f"{untar.stderr.decode(errors='replace').strip()}")
    if not release.conf.is_file():
        raise LabError(f"release {ref} has no conf/supervisord.conf: the lab cannot run it")
    python = venv_bin() / "python"
    # Compiled now, as bin/setup does for this checkout: its programs start without it.
    ip.run([str(python), "-m", "compileall", "-q", str(release.tree / "vmbusify")], check=False)
    release.bin_dir.mkdir(mode=0o700)
    for name, entry in _scripts(release).items():
        module, func = entry.split(":")
        script = release.bin_dir / name
        script.write_text(
            "#!/bin/sh\n"
            f"# Written by `vmbusify lab up`: {name} of release {ref} ({commit}) from its\n"
            "# exported tree, with this venv's interpreter and packages.\n"
            f"PYTHONPATH='{release.tree}'\n"
            "export PYTHONPATH\n"
            f"exec '{python}' -P -c 'import sys; sys.argv[0] = \"{name}\"; "
            f"from {module} import {func}; sys.exit({func}())' \"$@\"\n")
        script.chmod(0o700)
    for rel in _script_files(release):
        # A release's script file (vmbusifyexec from 0.2 on: pyproject's script-files), run
        # as it is with this venv's interpreter.
        script = release.bin_dir / os.path.basename(rel)
        script.write_text(
            "#!/bin/sh\n"
            f"# Written by `vmbusify lab up`: {script.name} of release {ref} ({commit}) from\n"
            "# its exported tree, with this venv's interpreter and packages.\n"
            f"PYTHONPATH='{release.tree}'\n"
            "export PYTHONPATH\n"
            f"exec '{python}' -P '{release.tree / rel}' \"$@\"\n")
        script.chmod(0o700)
    release.commit_file.write_text(stamp + "\n")
    return release, True


def _scripts(release: ReleaseTree) -> dict[str, str]:
    """The release's console scripts (name -> ``module:function``), from its pyproject.toml."""
    try:
        with open(release.tree / "pyproject.toml", "rb") as fh:
            scripts = tomllib.load(fh).get("project", {}).get("scripts", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LabError(f"release {release.ref}: cannot read its pyproject.toml: {exc}") from None
    if not isinstance(scripts, dict) or "vmbusify" not in scripts:
        raise LabError(f"release {release.ref} has no `vmbusify` console script")
    for name, entry in scripts.items():
        if not (re.fullmatch(r"[a-z][a-z0-9_-]*", name) and isinstance(entry, str)
                and _ENTRY_RE.match(entry)):
            raise LabError(f"release {release.ref}: cannot run its console script {name!r}")
    return dict(scripts)


def _script_files(release: ReleaseTree) -> list[str]:
    """The release's script files (``[tool.setuptools] script-files``), relative paths."""
    try:
        with open(release.tree / "pyproject.toml", "rb") as fh:
            tool = tomllib.load(fh).get("tool", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LabError(f"release {release.ref}: cannot read its pyproject.toml: {exc}") from None
    files = tool.get("setuptools", {}).get("script-files", [])
    for rel in files:
        if not (isinstance(rel, str) and re.fullmatch(r"[a-z][a-z0-9_/-]*", rel)
                and ".." not in rel.split("/") and (release.tree / rel).is_file()):
            raise LabError(f"release {release.ref}: cannot run its script file {rel!r}")
    return list(files)


def config_error(release: ReleaseTree, text: str, scratch: Path) -> str | None:
    """Why release ``release`` refuses the config ``text`` (its own loader says), or None.

    ``scratch`` is a directory the file may be written to for the check (removed after).
    """
    path = scratch / f".vmbusify.toml.{release.ref}.check"
    path.write_text(text)
    path.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMBUSIFY_")}
    env.update(release.env())
    try:
        proc = ip.run([str(venv_bin() / "python"), "-P", "-c", _CHECK_CONFIG, str(path)],
                      env=env, check=False)
    finally:
        path.unlink(missing_ok=True)
    if proc.returncode == 0:
        return None
    out = proc.stdout.strip() or proc.stderr.strip()
    return out.splitlines()[-1] if out else f"its config check exited {proc.returncode}"
