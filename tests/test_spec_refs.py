"""Every "SPEC section N" citation in the repository resolves to a numbered heading of docs/spec.md."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".benchmarks", "node_modules"}
SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ".cfg", ".rst"}
# "SPEC section 5", "SPEC sections 5-6", "SPEC 2", "SPEC 2-3", "SPEC §7", "SPEC section 5.1"
CITE = re.compile(r"\bSPEC(?:\s+sections?|\s*§)?\s*(\d+)(?:\.\d+)*(?:\s*(?:-|–|to|and)\s*(\d+))?")
HEADING = re.compile(r"^##\s+(\d+)\.\s+\S", re.M)


def _files():
    for p in REPO.rglob("*"):
        if p.suffix in SUFFIXES and p.is_file() and not (set(p.relative_to(REPO).parts[:-1]) & SKIP_DIRS) \
                and not any(part.endswith(".egg-info") for part in p.relative_to(REPO).parts):
            yield p


def citations() -> dict:
    """{section number: ["path:line", ...]} over the repository's text files."""
    out: dict = {}
    for p in _files():
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for m in CITE.finditer(text):
            a = int(m.group(1))
            b = int(m.group(2)) if m.group(2) else a
            line = text.count("\n", 0, m.start()) + 1
            for n in range(a, max(a, b) + 1):
                out.setdefault(n, []).append(f"{p.relative_to(REPO)}:{line}")
    return out


def test_cite_pattern():
    found = [(m.group(1), m.group(2)) for m in CITE.finditer(
        "SPEC section 5; SPEC sections 5-6; SPEC 2: x; SPEC 2-3 filters; SPEC §7; (SPEC: 1); SPEC formula")]
    assert found == [("5", None), ("5", "6"), ("2", None), ("2", "3"), ("7", None)]


def test_every_spec_citation_has_a_heading():
    spec = REPO / "docs" / "spec.md"
    assert spec.is_file(), "docs/spec.md is missing"
    headings = {int(n) for n in HEADING.findall(spec.read_text(encoding="utf-8"))}
    cites = citations()
    assert len(cites) >= 5, "the citation scan found almost nothing: is the pattern broken?"
    missing = {n: where[:3] for n, where in cites.items() if n not in headings}
    assert not missing, f"SPEC sections cited but not headed in docs/spec.md: {missing}"
