"""Hostile client, malformed or out-of-range requests sent straight to the leader: each gets a
clear BAD_REQUEST, nothing is applied by mistake, and the cluster stays whole (`guard`,
tests/hostile/conftest.py)."""

import pytest

import raftsql.driver as raftsql


def _request(cluster, req):
    return cluster.node_request(cluster.wait_leader(), {"id": 1, "op": "execute", **req}, 10.0)


@pytest.fixture(scope="module", autouse=True)
def table(cluster):
    r = _request(cluster, {"statements": [["CREATE TABLE IF NOT EXISTS r(x)", []]],
                           "client_id": "setup", "serial": 1})
    assert r["ok"] and r["result"]["error"] is None


def _count(cluster):
    return _request(cluster, {"statements": [["SELECT count(*) FROM r", []]]})["result"]["rows"]


@pytest.mark.parametrize("where", ["id", "params", "txn", "statements"])
def test_a_request_nested_1000_deep_is_a_bad_request(cluster, guard, where):
    nested = 1
    for _ in range(1000):
        nested = [nested]
    req = {"statements": [["SELECT ?", [1]]]}
    if where == "id":
        req = {"statements": [["SELECT 1", []]], "client_id": nested}
    elif where == "params":
        req = {"statements": [["INSERT INTO r VALUES(?)", [nested]]], "client_id": "n", "serial": 1}
    elif where == "txn":
        req = {"statements": [["SELECT 1", []]], "txn": {"writes": nested}}
    else:
        req = {"statements": nested}
    with guard():
        r = _request(cluster, req)
        if r["ok"]:  # a value SQLite cannot bind: an SQL error, never an internal error
            assert r["result"]["error"]["name"] == "RAFTSQL_PROGRAMMING"
        else:
            assert r["error"]["kind"] == "BAD_REQUEST", r
            assert "internal error" not in r["error"]["message"]
    assert _count(cluster) == [[0]]


@pytest.mark.parametrize("timeout_ms", [-5, 0, "10", 1.5])
def test_a_write_with_a_bad_timeout_is_refused_before_the_log(cluster, guard, timeout_ms):
    with guard():
        r = _request(cluster, {"statements": [["INSERT INTO r VALUES(1)", []]],
                               "client_id": "t", "serial": 1, "timeout_ms": timeout_ms})
        assert not r["ok"] and r["error"]["kind"] == "BAD_REQUEST"
        assert "timeout_ms" in r["error"]["message"]
    assert _count(cluster) == [[0]]  # refused, so not applied (it was OUTCOME_UNKNOWN and applied)


@pytest.mark.parametrize("field", ["base", "min_index", "read_index"])
def test_indexes_out_of_range_are_refused(cluster, guard, field):
    if field == "base":
        req = {"statements": [["SELECT * FROM r", []]],
               "txn": {"term": None, "base": -1, "client_id": "b"}}
    elif field == "min_index":
        req = {"statements": [["SELECT * FROM r", []]], "consistency": "stale",
               "min_index": 2**64 - 1}
    else:
        req = {"statements": [["INSERT INTO r VALUES(2)", []]], "client_id": "ri", "serial": 1,
               "commit": {"read_index": 2**63 + 5, "reads": ["r"], "last_ms": 1}}
    with guard():
        r = _request(cluster, req)
        assert not r["ok"] and r["error"]["kind"] == "BAD_REQUEST", r
        assert field in r["error"]["message"]
    # A transaction statement that claims more earlier writes than the leader holds for it
    # has nothing to build on: refused (run the transaction again), nothing applied.
    with guard():
        r = _request(cluster, {"statements": [["INSERT INTO r VALUES(3)", []]],
                               "txn": {"term": None, "base": 2**63, "client_id": "b"}})
        assert not r["ok"] and r["error"]["kind"] == "TXN_ABORTED", r
    assert _count(cluster) == [[0]]


def test_drop_trigger_if_exists_after_create_trigger(cluster, guard):
    conn = raftsql.connect(cluster.dsn, autocommit=True)
    try:
        with guard():
            conn.execute("CREATE TRIGGER tr AFTER INSERT ON r BEGIN SELECT 1; END")
            conn.execute("DROP TRIGGER IF EXISTS tr")
            conn.execute("DROP TRIGGER IF EXISTS tr")
            conn.executescript(
                "CREATE TRIGGER tr AFTER INSERT ON r BEGIN SELECT 1; END; DROP TRIGGER IF EXISTS tr;"
            )
        assert conn.execute("SELECT count(*) FROM sqlite_schema WHERE type='trigger'").fetchone() == (0,)
    finally:
        conn.close()


def test_a_failing_with_select_is_a_plain_error_not_outcome_unknown(cluster, guard):
    conn = raftsql.connect(cluster.dsn, autocommit=True)
    try:
        with guard():
            assert conn.execute("WITH x(a) AS (SELECT 1) SELECT a FROM x").fetchall() == [(1,)]
            with pytest.raises(raftsql.OperationalError) as info:
                conn.execute("WITH x(a) AS (SELECT 1) SELECT a FROM nosuch")
            assert not isinstance(info.value, raftsql.OutcomeUnknown)
            assert "no such table: nosuch" in str(info.value)
    finally:
        conn.close()
