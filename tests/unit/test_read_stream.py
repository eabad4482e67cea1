"""Streamed reads (StateMachine.open_query / ReadCursor): a result of any size leaves in chunks
of bounded size, every chunk from one snapshot, and TEXT that is not valid UTF-8 arrives as bytes
marked for the driver's text_factory."""

import pytest

from raftsql.command import Command
from raftsql.server.statemachine import StateMachine

T0 = 1_700_000_000_123


def entry(*statements):
    return Command(client_id="", serial=0, statements=[(s, ()) for s in statements],
                   leader_time_ms=T0, seed=1).encode()


@pytest.fixture
def sm(tmp_path):
    m = StateMachine(str(tmp_path / "db.sqlite"))
    m.apply(1, entry("CREATE TABLE t(id INTEGER PRIMARY KEY, x TEXT, pad BLOB)"))
    m.apply(2, entry("INSERT INTO t(x, pad) WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL "
                     "SELECT i+1 FROM c WHERE i < 3000) SELECT 'row ' || i, zeroblob(1000) FROM c"))
    yield m
    m.close()


def drain(result, cursor, chunk):
    rows, bad, sizes = list(result.rows), list(result.bad_text or []), [len(result.rows)]
    while cursor is not None:
        more, done = cursor.fetch(chunk)
        assert more is not None, cursor.error
        bad += [[len(rows) + r, c] for r, c in cursor.bad_text]
        rows += more
        sizes.append(len(more))
        if done:
            cursor.close()
            cursor = None
    return rows, bad, sizes


def test_a_large_result_leaves_in_chunks_of_bounded_size(sm):
    result, cursor = sm.open_query("SELECT id, x, pad FROM t ORDER BY id", first_bytes=50_000)
    assert cursor is not None and result.index == 2
    rows, bad, sizes = drain(result, cursor, 100_000)
    assert [r[0] for r in rows] == list(range(1, 3001)) and bad == []
    assert max(sizes) <= 100_000 // 1000 and len(sizes) > 20
    assert len(sm.reads._pools[False]) == 1  # the reader went back to the pool


def test_every_chunk_comes_from_the_snapshot_of_the_first(sm):
    result, cursor = sm.open_query("SELECT id FROM t ORDER BY id", first_bytes=4_000)
    sm.apply(3, entry("DELETE FROM t"))
    sm.apply(4, entry("INSERT INTO t(x) VALUES('new')"))
    rows, _, _ = drain(result, cursor, 4_000)
    assert len(rows) == 3000 and result.index == 2
    assert sm.query("SELECT count(*) FROM t").rows == [[1]]


def test_text_that_is_not_utf8_comes_as_bytes_with_its_position(sm):
    sm.apply(3, entry("UPDATE t SET x = CAST(x'ff61' AS TEXT) WHERE id IN (1, 2500)"))
    result, cursor = sm.open_query("SELECT id, x FROM t ORDER BY id", first_bytes=10_000)
    rows, bad, _ = drain(result, cursor, 10_000)
    assert bad == [[0, 1], [2499, 1]]
    assert rows[0] == [1, b"\xffa"] and rows[2499] == [2500, b"\xffa"] and rows[1] == [2, "row 2"]
    assert len(rows) == 3000
    # A statement that cannot be wrapped fails with sqlite3's message.
    r = sm.query("PRAGMA table_info(t)")
    assert r.error is None
    r = sm.query("EXPLAIN SELECT x FROM t WHERE id = 1")
    assert r.error is None


def test_a_row_larger_than_a_frame_is_a_clear_error(sm):
    result, cursor = sm.open_query("SELECT zeroblob(5000000)", max_row_bytes=1_000_000)
    assert cursor is None and result.error["name"] == "RAFTSQL_RESULT_TOO_BIG"
    assert "1000000" in result.error["message"] and "substr" in result.error["message"]


def test_query_without_streaming_is_bounded(sm):
    r = sm.query("SELECT pad FROM t", max_bytes=100_000)
    assert r.error["name"] == "RAFTSQL_RESULT_TOO_BIG" and "100000" in r.error["message"]
    assert len(sm.query("SELECT id FROM t").rows) == 3000


def test_a_read_that_calls_random_or_the_clock_through_a_view_is_marked_volatile(sm):
    """The authorizer names every function a statement calls, views included: a read marks
    itself volatile, from apsw's statement cache too (the authorizer then does not run)."""
    sm.apply(3, entry("CREATE VIEW dice AS SELECT random() AS r",
                      "CREATE VIEW today AS SELECT date('now') AS d",
                      "CREATE VIEW plain AS SELECT count(*) AS n FROM t"))
    for _ in range(3):  # the second and third come from each reader's statement cache
        assert sm.query("SELECT r FROM dice").volatile
        assert sm.query("SELECT d FROM today").volatile
        assert sm.query("SELECT abs(r) FROM dice").volatile
        assert not sm.query("SELECT n FROM plain").volatile
        assert not sm.query("SELECT x FROM t WHERE id = 1").volatile
    assert sm.query("SELECT * FROM no_such").error is not None
    sm.apply(4, entry("DROP VIEW plain", "CREATE VIEW plain AS SELECT randomblob(4) AS n"))
    assert sm.query("SELECT n FROM plain").volatile  # re-prepared after the schema changed
