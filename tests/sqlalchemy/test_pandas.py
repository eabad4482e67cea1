"""pandas on raftsql://: DataFrame.to_sql of 100,000 rows and read_sql back, equal, against a
real cluster; rows/s printed next to sqlite:// on a local file, measured the same way in the
same test (set RAFTSQL_PANDAS_REPORT=FILE to also write the table as Markdown)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
sa = pytest.importorskip("sqlalchemy")

ROWS = 100_000
CHUNK = 20_000  # one executemany (one log entry) per chunk, well under the 4 MiB request limit


def _frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({
        "id": range(n),
        "name": [f"name-{i}" for i in range(n)],
        "score": [i * 0.25 for i in range(n)],
        "flag": [i % 3 == 0 for i in range(n)],
        "ts": pd.date_range("2024-01-01", periods=n, freq="min"),
    })


def _round_trip(engine, df: pd.DataFrame, table: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    df.to_sql(table, engine, index=False, chunksize=CHUNK)
    t1 = time.perf_counter()
    back = pd.read_sql(f"SELECT * FROM {table} ORDER BY id", engine, parse_dates=["ts"])
    t2 = time.perf_counter()
    back["flag"] = back["flag"].astype(bool)  # SQLite stores booleans as 0/1
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    return len(df) / (t1 - t0), len(df) / (t2 - t1)


def test_to_sql_and_read_sql_100k_rows(sa_cluster, tmp_path):
    from raftsql.sqla_dialect import sqlalchemy_url

    df = _frame(ROWS)
    # A bulk load goes in AUTOCOMMIT: each chunk is one atomic executemany entry. (In a
    # transaction every write is re-sent with each statement and at commit, in one request of
    # at most 4 MiB: fine for thousands of rows, not for 100,000; see README.)
    raft = sa.create_engine(sqlalchemy_url(sa_cluster.dsn, timeout="30"),
                            isolation_level="AUTOCOMMIT")
    lite = sa.create_engine(f"sqlite:///{tmp_path / 'pandas.db'}")
    try:
        results = {"raftsql:// (3 nodes)": _round_trip(raft, df, "pandas_big"),
                   "sqlite:// (local file)": _round_trip(lite, df, "pandas_big")}
        # The default engine (transactions) with a smaller frame: one preview for the chunk.
        small = _frame(5_000)
        tx = sa.create_engine(sqlalchemy_url(sa_cluster.dsn, timeout="30"))
        try:
            results["raftsql:// in one transaction, 5,000 rows"] = _round_trip(tx, small, "pandas_tx")
        finally:
            tx.dispose()
    finally:
        raft.dispose()
        lite.dispose()
    lines = ["| engine | to_sql rows/s | read_sql rows/s |", "|---|---|---|"]
    lines += [f"| {name} | {w:,.0f} | {r:,.0f} |" for name, (w, r) in results.items()]
    report = "\n".join(lines)
    print("\n" + report)
    if os.environ.get("RAFTSQL_PANDAS_REPORT"):
        Path(os.environ["RAFTSQL_PANDAS_REPORT"]).write_text(report + "\n")
