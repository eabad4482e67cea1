"""The list-append checker (raftsql/testing/elle.py) on hand-made histories: each anomaly it
names is caught in a history that has it, and a serial history passes. Pure, no cluster."""

from __future__ import annotations

import pytest

from raftsql.testing import elle
from raftsql.testing.elle import Txn


def ok(i, *ops, t0=None, t1=None):
    return Txn(i, "ok", list(ops), process=i, invoke=float(i if t0 is None else t0),
               complete=float(i + 0.5 if t1 is None else t1))


def fail(i, *ops):
    return Txn(i, "fail", list(ops), process=i, invoke=float(i))


def A(k, v):  # noqa: N802 - Elle's notation
    return ("append", k, v)


def R(k, lst):  # noqa: N802
    return ("r", k, lst)


def anomalies(history, **kw) -> dict:
    return elle.check(history, **kw).counts


def test_a_serial_history_has_no_anomalies():
    h = [
        ok(0, A("x", 1), A("y", 1)),
        ok(1, R("x", [1]), A("x", 2), R("x", [1, 2])),
        ok(2, R("y", [1]), R("x", [1, 2]), A("y", 2)),
        ok(3, R("x", [1, 2]), R("y", [1, 2])),
    ]
    res = elle.check(h, realtime=True)
    assert res.valid, res.explain()
    assert res.edges["ww"] == 2 and res.edges["wr"] >= 3 and res.committed == 4


def test_g0_write_cycle():
    # T0 before T1 on x, T1 before T0 on y: no order of the two explains both lists.
    h = [ok(0, A("x", 1), A("y", 1)), ok(1, A("x", 2), A("y", 2)),
         ok(2, R("x", [1, 2]), R("y", [2, 1]))]
    assert "G0" in anomalies(h)


def test_g1a_aborted_read():
    h = [fail(0, A("x", 1)), ok(1, R("x", [1]))]
    found = elle.check(h)
    assert found.counts == {"G1a": 1}, found.explain()


def test_g1b_intermediate_read():
    h = [ok(0, A("x", 1), A("x", 2)), ok(1, R("x", [1]))]
    assert "G1b" in anomalies(h)


def test_g1c_circular_information_flow():
    h = [ok(0, A("x", 1), R("y", [2])), ok(1, A("y", 2), R("x", [1]))]
    res = elle.check(h)
    assert "G1c" in res.counts and "G0" not in res.counts, res.explain()


def test_g_single_read_skew():
    # T1 sees T0's append to y but not its append to x.
    h = [ok(0, A("x", 1), A("y", 1)), ok(1, R("x", []), R("y", [1])),
         ok(2, R("x", [1]), R("y", [1]))]
    assert anomalies(h) == {"G-single": 1}


def test_g2_write_skew():
    # Each reads the key the other appends to, sees it empty, appends to its own.
    h = [ok(0, R("x", []), A("y", 1)), ok(1, R("y", []), A("x", 1)),
         ok(2, R("x", [1]), R("y", [1]))]
    assert anomalies(h) == {"G2": 1}


def test_a_stale_read_is_a_realtime_anomaly_only():
    # T1 starts after T0 committed and still reads x empty: serializable (T1 before T0),
    # not strictly serializable.
    h = [ok(0, A("x", 1), t0=0, t1=1), ok(1, R("x", []), t0=2, t1=3), ok(2, R("x", [1]), t0=4, t1=5)]
    assert anomalies(h) == {}
    assert anomalies(h, realtime=True) == {"G-single-realtime": 1}


def test_order_duplicate_garbage_and_internal_anomalies():
    assert "incompatible-order" in anomalies([ok(0, A("x", 1)), ok(1, A("x", 2)),
                                              ok(2, R("x", [1, 2])), ok(3, R("x", [2, 1]))])
    assert "duplicate-elements" in anomalies([ok(0, A("x", 1)), ok(1, R("x", [1, 1]))])
    assert "garbage-read" in anomalies([ok(0, R("x", [9]))])
    assert "internal" in anomalies([ok(0, A("x", 1), R("x", []))])


def test_info_transactions_count_once_their_appends_were_seen():
    h = [Txn(0, "info", [A("x", 1), A("y", 1)], invoke=0.0),
         ok(1, R("x", [1]), R("y", [])), ok(2, R("y", [1]))]
    assert anomalies(h) == {"G-single": 1}  # T0 committed (x=1 was seen), T1 saw half of it
    assert anomalies([Txn(0, "info", [A("x", 1)]), ok(1, R("x", []))]) == {}


def test_events_become_transactions():
    events = [
        {"process": 1, "type": "invoke", "value": [["append", "x", 1], ["r", "x", None]], "time": 0.0},
        {"process": 2, "type": "invoke", "value": [["r", "x", None]], "time": 0.1},
        {"process": 1, "type": "ok", "value": [["append", "x", 1], ["r", "x", [1]]], "time": 0.2},
        {"process": 2, "type": "fail", "value": None, "time": 0.3},
        {"process": 3, "type": "invoke", "value": [["append", "x", 2]], "time": 0.4},
    ]
    txns = elle.from_events(events)
    assert [(t.type, t.ops[-1]) for t in txns] == [("ok", ("r", "x", [1])), ("fail", ("r", "x", None)),
                                                   ("info", ("append", "x", 2))]
    with pytest.raises(ValueError, match="appended twice"):
        elle.check([ok(0, A("x", 1)), ok(1, A("x", 1))])
