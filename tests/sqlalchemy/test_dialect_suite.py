"""SQLAlchemy's own dialect compliance suite (sqlalchemy.testing.suite), run the way
third-party dialects run it, against a live 3-node cluster, and the same suite on the stock
sqlite:// dialect with a local file in the same test, for comparison.

Each run is a subprocess pytest from suite/ (SQLAlchemy's pytest plugin takes over a whole
pytest session, so it cannot run inside this one), writing JUnit XML. The test then checks
that every suite test that passes on sqlite:// also passes on raftsql://, except those listed
in KNOWN with their reason, and prints passed/failed/skipped for both (the README's table).
Set RAFTSQL_SQLA_SUITE_REPORT=FILE to also write the comparison as Markdown."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

from raftsql.testing.cluster import LocalCluster

SUITE = Path(__file__).resolve().parent / "suite"

# Suite tests that pass on sqlite:// and not on raftsql://: (class, test-name regex) -> reason.
KNOWN: dict[tuple[str, str], str] = {
    ("ComponentReflectionTest", r"test_get_temp_|test_reflect_table_temp_table"):
        "TEMP tables and views are refused by the nodes (one connection's objects, not replicated)",
    ("HasTableTest", r"test_has_table_temp_"):
        "TEMP tables and views are refused by the nodes",
    ("TableViaSelectTest", r".*use_temp"):
        "TEMP tables and views are refused by the nodes",
    ("ComponentReflectionTestExtra", r"test_check_constraint_\w+\[True"):
        "creates its table in schema test_schema, which sqlite:// ATTACHes; ATTACH is refused by "
        "the nodes (a replicated database is one file)",
    ("LikeFunctionsTest", r"test_(not_)?regexp_match"):
        "the nodes' SQLite has no REGEXP function (pysqlite registers a Python one in the client "
        "process; on raftsql it would have to run on every node)",
}


def _outcomes(path: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """(class without its backend suffix, test name) -> (outcome, message)."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        kids = {k.tag: k for k in tc}
        state = ("failed" if "failure" in kids else "error" if "error" in kids
                 else "skipped" if "skipped" in kids else "passed")
        msg = next((kids[k].attrib.get("message", "") for k in ("failure", "error", "skipped")
                    if k in kids), "")
        cls = re.sub(r"_sqlite\+\w+_[\d_]+$", "", tc.attrib["classname"].split(".")[-1])
        key = (cls, tc.attrib["name"])
        if key in out and out[key][0] in ("failed", "error"):
            continue  # a setup error followed by a teardown entry: keep the failure
        out[key] = (state, " ".join(msg.split())[:300])
    return out


def _run_suite(url: str, junit: Path, cwd: Path) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(SUITE), *filter(None, [os.environ.get("PYTHONPATH")])]))
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(SUITE / "pytest.ini"), "--rootdir", str(SUITE),
         str(SUITE / "suite_tests.py"), "--dburi", url, "-p", "no:warnings",
         f"--junitxml={junit}", "-q"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if not junit.exists():
        pytest.fail(f"the suite did not run on {url}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.monotonic() - start


def _known(key: tuple[str, str]) -> str | None:
    for (cls, pattern), reason in KNOWN.items():
        if key[0] == cls and re.match(pattern, key[1]):
            return reason
    return None


def test_sqlalchemy_compliance_suite_on_raftsql_and_sqlite(tmp_path):
    pytest.importorskip("sqlalchemy")
    from raftsql.sqla_dialect import sqlalchemy_url

    # A cluster of its own: the suite's reflection tests expect a database with only its tables.
    cluster = LocalCluster(tmp_path / "cluster", 3)
    try:
        cluster.start()
        cluster.wait_leader()
        url = sqlalchemy_url(cluster.dsn, timeout="30").render_as_string(hide_password=False)
        raft_s = _run_suite(url, tmp_path / "raftsql.xml", tmp_path)
    finally:
        cluster.close()
    (tmp_path / "sqlite").mkdir()
    lite_s = _run_suite(f"sqlite:///{tmp_path / 'sqlite' / 'suite.db'}", tmp_path / "sqlite.xml",
                        tmp_path / "sqlite")
    raft, lite = _outcomes(tmp_path / "raftsql.xml"), _outcomes(tmp_path / "sqlite.xml")

    lines = ["| dialect | passed | failed | errors | skipped | seconds |", "|---|---|---|---|---|---|"]
    for name, res, secs in (("raftsql:// (3-node cluster)", raft, raft_s),
                            ("sqlite:// (local file)", lite, lite_s)):
        c = Counter(state for state, _ in res.values())
        lines.append(f"| {name} | {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} "
                     f"| {secs:.0f} |")
    listed, unexplained = [], []
    for key in sorted(lite):
        if lite[key][0] != "passed" or raft.get(key, ("missing",))[0] == "passed":
            continue
        state, msg = raft.get(key, ("missing", ""))
        reason = _known(key)
        (listed if reason else unexplained).append((key, state, reason or msg))
    lines += ["", f"Passing on sqlite:// but not on raftsql://: {len(listed) + len(unexplained)}"]
    lines += [f"- {k[0]}::{k[1]} ({state}): {why}" for k, state, why in listed + unexplained]
    report = "\n".join(lines)
    print(report)
    if os.environ.get("RAFTSQL_SQLA_SUITE_REPORT"):
        Path(os.environ["RAFTSQL_SQLA_SUITE_REPORT"]).write_text(report + "\n")
    assert not unexplained, "\n".join(f"{k[0]}::{k[1]} {s}: {m}" for k, s, m in unexplained)
    # The suite really ran on both (a broken harness would skip or error everything).
    assert sum(s == "passed" for s, _ in raft.values()) > 900
    assert sum(s == "passed" for s, _ in lite.values()) > 900
