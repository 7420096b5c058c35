"""Every result table in README.md and docs/*.md names the command that regenerates it, and the cheap ones are
recomputed here and must equal the docs' numbers.

What a table is: outside fenced code blocks, a line starting with "|" followed by a separator line
("|---|---|", colons allowed), then every following line starting with "|". A table is a **result table**
when a body cell holds a number with a decimal point or a percentage (regex NUMERIC below), unless its header
line is in REFERENCE_TABLES (option / reference tables whose numbers are settings, not measurements). So a new
table of measurements cannot slip in without its line.

The line: directly above the table's header or directly below its last row (one blank line between allowed),

    Regenerate: `COMMAND`[; `COMMAND` ...] (measured at COMMIT[, where]) [free text]

COMMAND is `segfast SUBCOMMAND ...` (parsed by the real CLI parser, segfast.cli.build_parser, without running),
`python bench/SCRIPT.py ...` (the script exists and its argparse accepts the arguments: the script runs up to
its parse_args and stops there) or `python -m pytest tests/FILE.py ...` (the file exists; every -k word names
something in it). Several commands run in order (data preparation first). COMMIT is the commit at which the
numbers were measured (7-40 hex digits; checked to be a commit of this repository's history when git can tell).
A table that current code cannot regenerate says instead

    Historical: measured at COMMIT (why it cannot be regenerated)

The cheap tables (bench/doc_tables.py's rows that need no training: baselines, the planted-truth ceiling) are
recomputed through bench/doc_tables.py with --cheap-only, row by row against the doc's row of the same label;
the rows that need training are checked for their presence only. README's headline numbers must agree with
docs/model.md's demo table and carry their own Regenerate line.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
# as tests/conftest.py: the public SegMM sample (not in the repository), .ci/run sets the variable
SAMPLE_CSV = Path(os.environ.get("SEGFAST_SEGMM_SAMPLE") or REPO.parent / "shared" / "data" / "SegMM_inter_sample.csv")
DOCS = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))

NUMERIC = re.compile(r"\d\.\d|\d\s*%")
SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")
# header lines of the tables that hold settings, not measurements (exact text)
REFERENCE_TABLES = {
    "docs/model.md": ["| topic | SPEC | segfast default | literal form |"],
}
REGENERATE = re.compile(r"^Regenerate: (?P<cmds>`[^`]+`(?:; `[^`]+`)*) \(measured at (?P<commit>[0-9a-f]{7,40})"
                        r"(?:, (?P<where>[^)]+))?\)(?P<rest>.*)$")
HISTORICAL = re.compile(r"^Historical: measured at (?P<commit>[0-9a-f]{7,40}) \((?P<why>[^)]+)\)")
LABEL = re.compile(r"^(Regenerate|Historical):")


@dataclass
class Table:
    doc: str  # path relative to the repo
    line: int  # 1-based line of the header
    header: str
    rows: List[List[str]]
    label: Optional[str] = None  # the Regenerate / Historical line
    commands: List[List[str]] = field(default_factory=list)


def cells(line: str) -> List[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def plain(cell: str) -> str:
    return cell.replace("**", "").strip()


def find_tables(path: Path) -> List[Table]:
    return tables_of(path.read_text(encoding="utf-8").splitlines(), str(path.relative_to(REPO)))


def tables_of(lines: List[str], doc: str) -> List[Table]:
    out, i, fence = [], 0, False
    while i < len(lines):
        s = lines[i]
        if s.lstrip().startswith("```"):
            fence = not fence
        elif not fence and s.startswith("|") and i + 1 < len(lines) and SEPARATOR.match(lines[i + 1]):
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            t = Table(doc, i + 1, s.strip(), [cells(x) for x in lines[i + 2:j]])
            near = [k for k in (i - 1, i - 2, j, j + 1) if 0 <= k < len(lines)]
            for k in near:
                between = lines[min(k, i - 1) + 1:i] if k < i else lines[j:k]
                if LABEL.match(lines[k]) and all(not x.strip() for x in between):
                    t.label = lines[k]
                    break
            out.append(t)
            i = j
            continue
        i += 1
    return out


def is_result_table(t: Table) -> bool:
    if t.header in REFERENCE_TABLES.get(t.doc, []):
        return False
    return any(NUMERIC.search(c) for r in t.rows for c in r)


ALL_TABLES = [t for d in DOCS for t in find_tables(d)]
RESULT_TABLES = [t for t in ALL_TABLES if is_result_table(t)]


def _id(t: Table) -> str:
    return f"{t.doc}:{t.line}"


# ----------------------------------------------------------------------------------------------------------
# the convention itself

def test_the_detector_sees_the_known_result_tables():
    docs = {t.doc for t in RESULT_TABLES}
    assert {"docs/model.md", "docs/segrec.md", "docs/scoring.md", "docs/synth.md", "docs/internals.md"} <= docs
    headers = [t.header for t in RESULT_TABLES]
    assert "| backbone | weighting | AUC | F1 | LogLoss | p (AUC vs Video) |" in headers
    for doc, hs in REFERENCE_TABLES.items():  # the allow-list names tables that exist
        assert all(any(t.doc == doc and t.header == h for t in ALL_TABLES) for h in hs), (doc, hs)


def test_a_new_unlabelled_table_is_caught():
    text = ("text\n\n| run | HR@1 |\n|---|---|\n| a | 0.5 |\n\n```\n| x | 1.5 |\n|---|---|\n```\n"
            "\nRegenerate: `segfast demo` (measured at 0123456)\n\n| n | wall |\n|:--|--:|\n| 1 | 3 % |\n"
            "\n| code | meaning |\n|---|---|\n| 2 | bad input |\n")
    got = tables_of(text.splitlines(), "x.md")  # the table in the code fence is not a table
    assert [(t.line, t.label) for t in got] == [(3, None), (14, "Regenerate: `segfast demo` (measured at 0123456)"),
                                                (18, None)]
    assert [is_result_table(t) for t in got] == [True, True, False]  # integers only: not a result table
    assert REGENERATE.match(got[1].label).group("commit") == "0123456"


@pytest.mark.parametrize("t", RESULT_TABLES, ids=_id)
def test_every_result_table_names_its_command(t):
    assert t.label is not None, (
        f"{t.doc}:{t.line}: result table {t.header!r} has no 'Regenerate: `COMMAND` (measured at COMMIT)' or "
        f"'Historical: measured at COMMIT (why)' line directly above or below it (tests/test_doc_tables.py)")
    m = REGENERATE.match(t.label) or HISTORICAL.match(t.label)
    assert m, f"{t.doc}:{t.line}: malformed line {t.label!r}; expected " + REGENERATE.pattern
    _check_commit(m.group("commit"), t)
    if t.label.startswith("Regenerate:"):
        for cmd in re.findall(r"`([^`]+)`", m.group("cmds")):
            check_command(cmd, where=f"{t.doc}:{t.line}")


def _git(*args) -> Optional[str]:
    try:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _check_commit(commit: str, t: Table) -> None:
    if _git("rev-parse", "--is-inside-work-tree") != "true" or _git("rev-parse", "--is-shallow-repository") != "false":
        return  # not a full git checkout (a wheel, an sdist, a shallow clone): the commit cannot be looked up
    full = _git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    assert full, f"{t.doc}:{t.line}: 'measured at {commit}' is not a commit of this repository"
    assert _git("merge-base", "--is-ancestor", full, "HEAD") is not None, \
        f"{t.doc}:{t.line}: commit {commit} is not in the history of HEAD"


# ----------------------------------------------------------------------------------------------------------
# commands

def need(ok, msg: str) -> None:
    """A failed check of a command: pytest.fail (one kind of failure, so the probe test can expect it)."""
    if not ok:
        pytest.fail(msg)


class _Parsed(Exception):
    pass


def check_command(cmd: str, where: str = "") -> None:
    argv = shlex.split(cmd)
    need(argv, f"{where}: empty command")
    if argv[0] == "segfast":
        check_segfast(argv[1:], where)
    elif argv[0] in ("python", "python3", ".venv/bin/python") and argv[1:3] == ["-m", "pytest"]:
        check_pytest(argv[3:], where)
    elif argv[0] in ("python", "python3", ".venv/bin/python") and len(argv) > 1 and argv[1].startswith("bench/"):
        check_bench(argv[1], argv[2:], where)
    else:
        pytest.fail(f"{where}: {cmd!r}: a regenerating command is `segfast ...`, `python bench/X.py ...` or "
                    f"`python -m pytest tests/...`")


def check_segfast(args: List[str], where: str) -> None:
    from segfast.cli import build_parser

    try:
        a = build_parser().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{where}: `segfast {' '.join(args)}` does not parse (exit {e.code})")
    need(callable(getattr(a, "func", None)), f"{where}: `segfast {' '.join(args)}` names no subcommand")


def check_bench(script: str, args: List[str], where: str) -> None:
    path = REPO / script
    need(path.is_file(), f"{where}: {script} does not exist")
    orig = argparse.ArgumentParser.parse_args
    seen = []

    def parse_then_stop(self, a=None, namespace=None):
        ns = orig(self, a, namespace)
        seen.append(ns)
        raise _Parsed

    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.parent))
    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        runpy.run_path(str(path), run_name="__main__")
    except _Parsed:
        pass
    except SystemExit as e:
        pytest.fail(f"{where}: `python {script} {' '.join(args)}`: its argparse refused the arguments (exit {e.code})")
    finally:
        argparse.ArgumentParser.parse_args = orig
        sys.argv, sys.path[:] = old_argv, old_path
    need(seen, f"{where}: {script} parsed no arguments (no argparse command line?)")


def check_pytest(args: List[str], where: str) -> None:
    files = [a for a in args if a.startswith("tests/")]
    need(files, f"{where}: pytest command names no tests/ file")
    text = ""
    for f in files:
        p = REPO / f.split("::")[0]
        need(p.is_file(), f"{where}: {f} does not exist")
        text += p.read_text()
    if "-k" in args:
        expr = args[args.index("-k") + 1]
        for word in re.findall(r"[A-Za-z_]\w*", expr):
            if word not in ("and", "or", "not"):
                need(word in text, f"{where}: -k {expr!r}: {word!r} names nothing in {files}")


def test_check_command_rejects_what_does_not_exist():
    check_command("segfast baselines --data d --split test")
    check_command("python bench/doc_tables.py demo-steps --cheap-only")
    for bad in ("segfast baselines --split test",  # --data missing
                "segfast no-such-command",
                "python bench/doc_tables.py no-such-table",
                "python bench/no_such_script.py",
                "python -m pytest tests/no_such_test.py",
                "python -m pytest tests/test_precision.py -k no_such_test_name",
                "bash run_everything.sh"):
        with pytest.raises(pytest.fail.Exception):
            check_command(bad, where="probe")


# ----------------------------------------------------------------------------------------------------------
# the cheap tables, recomputed

def _doc_tables():
    spec = importlib.util.spec_from_file_location("doc_tables", REPO / "bench" / "doc_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tables_made_by(name: str) -> List[Table]:
    out = []
    for t in RESULT_TABLES:
        m = REGENERATE.match(t.label or "")
        for cmd in re.findall(r"`([^`]+)`", m.group("cmds")) if m else []:
            argv = shlex.split(cmd)
            if len(argv) > 2 and argv[1] == "bench/doc_tables.py" and argv[2] == name:
                out.append(t)
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("doc_tables")


def _check_against_doc(name: str, md: str, not_run: str) -> None:
    tables = _tables_made_by(name)
    assert tables, f"no docs table names `python bench/doc_tables.py {name}`"
    table_lines = md.split("\n\n")[0].splitlines()  # the first block: the table (notes may follow)
    made = [cells(x) for x in table_lines[2:]]
    for t in tables:
        assert [plain(c) for c in cells(table_lines[0])] == [plain(c) for c in cells(t.header)], \
            f"{t.doc}:{t.line}: the header differs from what bench/doc_tables.py {name} makes"
        doc_rows = {plain(r[0]): r for r in t.rows}
        assert [plain(r[0]) for r in made] == [plain(r[0]) for r in t.rows], \
            f"{t.doc}:{t.line}: the rows of the table differ from what bench/doc_tables.py {name} makes"
        checked = 0
        for r in made:
            if not_run in r:
                continue
            want = doc_rows[plain(r[0])]
            assert [plain(c) for c in r] == [plain(c) for c in want], f"{t.doc}:{t.line}: row {r[0]!r}"
            checked += 1
        assert checked, f"{name}: no cheap row to check"


@pytest.mark.usefixtures("one_thread")
def test_demo_table_cheap_rows_equal_the_doc(work):
    """ItemPosition and the planted-truth ceiling on the demo's data, recomputed."""
    dt = _doc_tables()
    ctx = dt.Ctx(work, Path("/nonexistent"), threads=1, cheap_only=True)
    _check_against_doc("demo-steps", dt.TABLES["demo-steps"](ctx), dt.NOT_RUN)


@pytest.mark.usefixtures("one_thread")
def test_sample_table_baseline_rows_equal_the_doc(work, sample_csv):
    """UserPosition and ItemPosition on the real SegMM sample (all rows and cold), recomputed."""
    dt = _doc_tables()
    ctx = dt.Ctx(work, Path(sample_csv), threads=1, cheap_only=True)
    _check_against_doc("sample-unseen", dt.TABLES["sample-unseen"](ctx), dt.NOT_RUN)


@pytest.mark.usefixtures("one_thread")
def test_synth_strength_table_and_shares_equal_the_doc(work):
    """docs/synth.md: the planted-truth ceiling and the baselines on the 90,000-row synthetic set, and the
    shares of first-segment leaves and full watches (synthetic; the real sample's where it is present)."""
    dt = _doc_tables()
    md = dt.TABLES["synth-strength"](dt.Ctx(work, SAMPLE_CSV, threads=1, cheap_only=True))
    _check_against_doc("synth-strength", md, dt.NOT_RUN)
    m = re.search(r"have (\d+)% leaves in the first segment and (\d+)% full watches \(the real sample: (\d+)% and "
                  r"(\d+)%", _doc("docs/synth.md"))
    assert m, "docs/synth.md: the shares sentence moved; update this test"
    made = {k: re.match(r"(\d+)% leaves in the first segment, (\d+)% full watches", v).groups()
            for k, v in (x.split(": ", 1) for x in md.split("\n\n")[1].splitlines())}
    assert made["synthetic rows"] == m.groups()[:2]
    if SAMPLE_CSV.is_file():
        assert made["the real sample"] == m.groups()[2:]


def test_readme_headline_matches_the_demo_table():
    """README's demo numbers (3 decimals) are docs/model.md's demo row and ItemPosition row, and say how to
    regenerate them."""
    readme = (REPO / "README.md").read_text()
    m = re.search(r"HR@1 (0\.\d{3}) / NDCG@5 (0\.\d{3}) against ItemPosition's (0\.\d{3}) / (0\.\d{3})", readme)
    assert m, "README: the demo's headline sentence moved; update this test"
    (demo,) = _tables_made_by("demo-steps")
    rows = {plain(r[0]): [plain(c) for c in r[1:]] for r in demo.rows}
    ours = next(v for k, v in rows.items() if k.startswith("the demo"))
    base = rows["ItemPosition (best baseline)"]
    assert [f"{float(x):.3f}" for x in ours + base] == list(m.groups())
    assert re.search(r"^Regenerate: `segfast demo`", readme, re.M), "README: no Regenerate line for the demo's numbers"
    line = next(x for x in readme.splitlines() if x.startswith("Regenerate: `segfast demo`"))
    assert REGENERATE.match(line), line
    for cmd in re.findall(r"`([^`]+)`", REGENERATE.match(line).group("cmds")):
        check_command(cmd, "README.md")


def _n(s: str) -> int:
    return int(s.replace(",", ""))


def _stats(data_dir: Path) -> dict:
    import json

    import numpy as np

    from segfast.data.prepared import load_prepared

    c = json.loads((data_dir / "manifest.json").read_text())["counts"]
    prep = load_prepared(data_dir)
    test = prep.rows("test")
    return {**c["splits"], "users": c["users"], "cold_test": c["cold_test"],
            "ranked_test": int((np.asarray(prep.interactions["target"][test]) < 40).sum())}


def _doc(path: str) -> str:
    return re.sub(r"\s+", " ", (REPO / path).read_text())  # sentences wrap: match across line breaks


@pytest.mark.usefixtures("one_thread")
def test_demo_data_statistics_in_the_docs(work):
    """The demo data's split sizes and ranked test rows quoted in docs/model.md and docs/segrec.md."""
    dt = _doc_tables()
    _, data = dt.Ctx(work, Path("/nonexistent"), threads=1, cheap_only=True).demo_data()
    s = _stats(data)
    for doc in ("docs/model.md", "docs/segrec.md"):
        found = re.findall(r"seed 0 -> ([\d,]+) train / ([\d,]+) dev / ([\d,]+) test rows", _doc(doc))
        assert found, f"{doc}: the demo data's split sentence moved; update this test"
        for tr, dv, te in found:
            assert (_n(tr), _n(dv), _n(te)) == (s["train"], s["dev"], s["test"]), doc
    m = re.search(r"test split, ([\d,]+) rows with y < 40", _doc("docs/model.md"))
    assert m and _n(m.group(1)) == s["ranked_test"]


@pytest.mark.usefixtures("one_thread")
def test_sample_statistics_in_the_docs(work, sample_csv):
    """The real sample's users, split sizes and cold test rows quoted in docs/segrec.md and docs/model.md."""
    dt = _doc_tables()
    s = _stats(dt.Ctx(work, Path(sample_csv), threads=1, cheap_only=True).sample_data())
    m = re.search(r"ID only: (\d+) users, ([\d,]+) / ([\d,]+) / ([\d,]+) rows, ([\d,]+) test rows cold",
                  _doc("docs/segrec.md"))
    assert m, "docs/segrec.md: the sample's statistics sentence moved; update this test"
    assert [_n(x) for x in m.groups()] == [s["users"], s["train"], s["dev"], s["test"], s["cold_test"]]
    m = re.search(r"test ([\d,]+) rows, ([\d,]+) cold\)", _doc("docs/model.md"))
    assert m and [_n(x) for x in m.groups()] == [s["ranked_test"], s["cold_test"]]
