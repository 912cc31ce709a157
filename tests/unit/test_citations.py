"""Citations resolve: every ``docs/NAME.md`` the code and docs cite exists, a section cited
by name (``docs/exec.md, "A light client"``) is a heading or bold lead-in of that file, and
nothing cites the numbered sections of a specification the repository does not hold."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["vmbusify", "tests", "bench", "docs", "README.md", "conf", "packaging"]

#: ``docs/x.md``, optionally followed by ``, "Section"`` or `` "Section"``.
CITATION = re.compile(r'docs/([\w.-]+\.md)(?:,?\s+"([^"]+)")?')
#: "spec 4.2", "spec §3.1", "spec section 4.1", "the spec's", "(spec sync_send)".
SPEC = re.compile(r"\bspec(?:'s\b|\s+(?:§|section\s+)?\d|\s+[a-z_]+_[a-z_]+\b)", re.IGNORECASE)


def _texts() -> list[tuple[Path, str]]:
    out = []
    for name in SOURCES:
        base = ROOT / name
        files = [base] if base.is_file() else sorted(
            p for p in base.rglob("*") if p.suffix in (".py", ".md", ".toml", ".conf"))
        for path in files:
            if path.resolve() == Path(__file__).resolve():
                continue
            # A citation may wrap: join lines, dropping comment and docstring indentation.
            text = re.sub(r"\s*\n\s*(?:#:?\s*)?", " ", path.read_text())
            out.append((path.relative_to(ROOT), text))
    return out


def _sections(doc: Path) -> set[str]:
    """The headings of ``doc`` and the bold phrases that open its paragraphs."""
    out = set()
    for line in doc.read_text().splitlines():
        m = re.match(r"#+\s+(.*\S)", line) or re.match(r"\*\*(.+?)\.?\*\*", line)
        if m:
            out.add(m.group(1))
    return out


def _names(cited: str, section: str) -> bool:
    """Whether ``cited`` names ``section``: all of it, all before a parenthesis or a colon
    ("The bus" for "The bus (ZeroMQ, one endpoint)"), or all after the colon ("virtio-serial"
    for "QEMU without vsock: virtio-serial")."""
    return (section == cited or section.startswith((f"{cited} (", f"{cited}:"))
            or section.endswith(f": {cited}"))


def test_every_cited_doc_and_section_exists() -> None:
    missing = []
    for path, text in _texts():
        for m in CITATION.finditer(text):
            doc = ROOT / "docs" / m.group(1)
            if not doc.is_file():
                missing.append(f"{path}: docs/{m.group(1)} does not exist")
            elif m.group(2) and not any(_names(m.group(2), s) for s in _sections(doc)):
                missing.append(f'{path}: docs/{m.group(1)} has no section "{m.group(2)}"')
    assert "\n".join(missing) == ""


def test_nothing_cites_a_specification_the_repository_does_not_hold() -> None:
    found = [f"{path}: {m.group(0)!r}" for path, text in _texts() for m in SPEC.finditer(text)]
    assert found == []


def test_the_patterns_catch_what_they_must() -> None:
    assert SPEC.findall("the listener (spec 4.2.2), spec §3.1 and the spec's 6542") == [
        "spec 4", "spec §3", "spec's"]
    assert SPEC.findall("(spec get_vmid_by_ip); an ExecSpec; spec = ExecSpec(...)") == [
        "spec get_vmid_by_ip"]
    assert _names("The bus", "The bus (ZeroMQ, one endpoint)")
    assert _names("virtio-serial", "QEMU without vsock: virtio-serial")
    assert _names("QEMU without vsock", "QEMU without vsock: virtio-serial")
    assert not _names("The bus", "The business")
    assert [m.groups() for m in CITATION.finditer(
        'docs/exec.md, "A light client" and docs/proxy.md')] == [
        ("exec.md", "A light client"), ("proxy.md", None)]
