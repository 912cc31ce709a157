"""The previous release's guest stack is in every clone: the archive the repository ships
(packaging/releases/) stands in for the tag where a clone has none, as CI's has none."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from vmbusify.errors import LabError
from vmbusify.lab import release
from vmbusify.lab.layout import repo_root

OLD_RELEASE = "v0.1.0"


def _without_tags(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a clone without tags: git knows no release ref."""
    monkeypatch.setattr(release, "_git_commit", lambda ref: None)


def test_a_clone_without_the_tag_uses_the_shipped_archive(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    _without_tags(monkeypatch)
    commit, data = release.release_tar(OLD_RELEASE)
    assert len(commit) == 40
    assert release.commit_of(OLD_RELEASE) == commit
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = set(tar.getnames())
    assert {"conf/supervisord.conf", "pyproject.toml", "vmbusify/mux/app.py"} <= names
    assert not any(n.startswith(("tests/", "docs/", "/")) or ".." in n for n in names)
    source = release.release_file(OLD_RELEASE, "pyproject.toml").decode()
    assert 'version = "0.1.0"' in source


def test_an_unknown_release_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_tags(monkeypatch)
    with pytest.raises(LabError, match=r"neither in .* nor shipped"):
        release.commit_of("v9.9.9")
    with pytest.raises(LabError, match="has no file"):
        release.release_file(OLD_RELEASE, "vmbusify/no/such.py")


def test_the_shipped_archive_is_the_tag_where_git_has_it(tmp_path: Path) -> None:
    """The shipped copy is what `git archive` makes of the tag, byte for byte in every file."""
    got = subprocess.run(["git", "-C", str(repo_root()), "rev-parse", "--verify", "--quiet",
                          f"{OLD_RELEASE}^{{commit}}"], capture_output=True, text=True,
                         check=False)
    if got.returncode != 0:
        pytest.skip(f"this clone has no tag {OLD_RELEASE} to compare the shipped archive with")
    git_commit, git_tar = release.release_tar(OLD_RELEASE)
    shipped = release._shipped(OLD_RELEASE)
    assert shipped is not None
    assert shipped[0] == git_commit == got.stdout.strip()

    def files(data: bytes) -> dict[str, bytes]:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return {m.name: (tar.extractfile(m) or io.BytesIO(b"")).read()
                    for m in tar.getmembers() if m.isfile()}

    assert files(shipped[1]) == files(git_tar)
