"""Check that the results docs' tables (docs/results.md and the others in ``RUN_DOCS``) are what
``edgetrain report`` computes from the kept runs.

Convention: a table that comes from kept runs is preceded (blank lines allowed between) by one line

    <!-- report: docs/results/runs/fl-*-ls19-* -->

naming the kept run directories (paths or globs, relative to the repository root, space-separated).
That table must equal, cell for cell, ``edgetrain report``'s table by configuration (mean ± 95 % CI
over seeds, ``aggregator.report_groups``) of those runs. No training: only the kept metrics.jsonl and
summary.json files are read. Every number in the doc's tables must come from kept runs, so a table
without the line fails too (figures of another kind belong in another doc). Exit status 1 on any
mismatch or unmarked table, with the line and cell that differ. ``--write`` regenerates every marked
table in place from its kept runs instead (after ``experiments/run_all.sh``, or when the report gains a
column), then checks again.

    python experiments/check_results.py [DOC ...] [--root DIR] [--write]
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from edgetrain.aggregator.report import DEFAULT_TARGETS, load_run
from edgetrain.aggregator.report_groups import group_runs, group_table
from edgetrain.sdk.errors import EdgetrainError

# The docs whose every table is recomputed from kept runs: the comparison (issue 16, one sitting), the
# robustness tables (issue 17) and the shorter-rounds tables of an earlier sitting.
RUN_DOCS = ("docs/results.md", "docs/robustness.md", "docs/short-rounds.md")
MARKER = re.compile(r"^\s*<!--\s*report:\s*(?P<runs>.+?)\s*-->\s*$")
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Table:
    line: int  # 1-based line of the table's header row
    end: int  # 1-based line after its last row
    rows: tuple[tuple[str, ...], ...]  # cells of every row, the separator row left out
    run_patterns: tuple[str, ...]  # from the marker line; empty: no kept runs named


def _cells(line: str) -> tuple[str, ...]:
    return tuple(cell.strip() for cell in line.strip().strip("|").split("|"))


def _is_separator(cells: tuple[str, ...]) -> bool:
    return all(re.fullmatch(r":?-+:?", c) for c in cells)


def find_tables(text: str) -> list[Table]:
    """Every Markdown table in ``text`` and the run patterns of the marker line before it, if any."""
    tables: list[Table] = []
    lines = text.splitlines()
    patterns: tuple[str, ...] = ()
    index = 0
    while index < len(lines):
        line = lines[index]
        marker = MARKER.match(line)
        if marker:
            patterns = tuple(marker.group("runs").split())
        elif line.lstrip().startswith("|"):
            start = index
            while index < len(lines) and lines[index].lstrip().startswith("|"):
                index += 1
            rows = tuple(c for c in (_cells(x) for x in lines[start:index]) if not _is_separator(c))
            tables.append(Table(start + 1, index + 1, rows, patterns))
            patterns = ()
            continue
        elif line.strip():  # a marker applies only to the table right after it
            patterns = ()
        index += 1
    return tables


def expected_table(patterns: tuple[str, ...], root: Path) -> str:
    """``edgetrain report``'s by-configuration table (Markdown) of the runs the patterns name."""
    run_dirs = sorted({d for p in patterns for d in root.glob(p) if d.is_dir()})
    if not run_dirs:
        raise EdgetrainError(f"no run directory matches {' '.join(patterns)!r} under {root}")
    runs = [load_run(d, DEFAULT_TARGETS) for d in run_dirs]
    return group_table(group_runs(runs, DEFAULT_TARGETS), DEFAULT_TARGETS)


def expected_rows(patterns: tuple[str, ...], root: Path) -> tuple[tuple[str, ...], ...]:
    """The cells of ``expected_table``'s rows, the separator row left out."""
    text = expected_table(patterns, root)
    return tuple(c for c in (_cells(x) for x in text.splitlines()) if not _is_separator(c))


def regenerate(text: str, root: Path) -> str:
    """``text`` with every marked table replaced by the one its kept runs give now."""
    lines = text.splitlines(keepends=True)
    for table in reversed(find_tables(text)):  # from the end: earlier line numbers stay valid
        if table.run_patterns:
            lines[table.line - 1:table.end - 1] = [expected_table(table.run_patterns, root)]
    return "".join(lines)


def compare(table: Table, expected: tuple[tuple[str, ...], ...]) -> list[str]:
    """One message per difference between the doc's rows and the recomputed ones."""
    problems = []
    if len(table.rows) != len(expected):
        problems.append(f"{len(table.rows) - 1} rows in the doc, {len(expected) - 1} configurations in the runs")
    header = expected[0] if expected else ()
    for offset, (doc_row, run_row) in enumerate(zip(table.rows, expected)):
        if len(doc_row) != len(run_row):
            problems.append(f"row {offset}: {len(doc_row)} cells in the doc, {len(run_row)} recomputed")
            continue
        for column, (ours, theirs) in enumerate(zip(doc_row, run_row)):
            if ours != theirs:
                name = header[column] if column < len(header) else str(column)
                problems.append(f"row {offset} ({run_row[0]!r}), column {name!r}: doc says {ours!r}, "
                                f"the kept runs give {theirs!r}")
    return problems


def check(doc: Path, root: Path) -> tuple[list[str], list[str]]:
    """(failures, notes) for every table of ``doc``."""
    failures, notes = [], []
    for table in find_tables(doc.read_text()):
        where = f"{doc}:{table.line}"
        if not table.run_patterns:
            failures.append(f"{where}: a table that names no kept runs (no '<!-- report: RUNS -->' line before "
                            "it): every table here must be recomputed from kept runs")
            continue
        try:
            expected = expected_rows(table.run_patterns, root)
        except EdgetrainError as exc:
            failures.append(f"{where}: {exc}")
            continue
        problems = compare(table, expected)
        failures += [f"{where}: {p}" for p in problems]
        if not problems:
            notes.append(f"{where}: ok ({len(expected) - 1} configurations from {' '.join(table.run_patterns)})")
    return failures, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("docs", nargs="*", type=Path, metavar="DOC",
                        help="default: the docs whose tables come from kept runs, " + ", ".join(RUN_DOCS))
    parser.add_argument("--root", type=Path, default=ROOT, help="where the marker's run paths start")
    parser.add_argument("--write", action="store_true", help="regenerate the marked tables from the kept runs first")
    args = parser.parse_args(argv)
    docs = args.docs or [ROOT / doc for doc in RUN_DOCS]
    status = 0
    for doc in docs:
        if args.write:
            try:
                doc.write_text(regenerate(doc.read_text(), args.root))
            except EdgetrainError as exc:
                print(f"check_results: {doc}: {exc}", file=sys.stderr)
                status = 1
                continue
        failures, notes = check(doc, args.root)
        for note in notes:
            print(note)
        for failure in failures:
            print(f"MISMATCH {failure}", file=sys.stderr)
        if failures:
            print(f"check_results: {len(failures)} mismatch(es) in {doc}", file=sys.stderr)
            status = 1
        else:
            print(f"check_results: every table in {doc} matches its kept runs")
    return status


if __name__ == "__main__":
    sys.exit(main())
