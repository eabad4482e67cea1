"""The linearizability checker (raftsql/testing/checker.py) on handmade histories: known-bad ones must be
reported, known-good ones must pass, and on random small histories it must agree with a
brute-force search over every order."""

import itertools
import random
import time

import pytest

from raftsql.testing.checker import (
    Op,
    RegisterModel,
    check_linearizable,
    check_read_your_writes,
    check_registers,
    check_set,
    ops_from_events,
)


class H:
    """Build a one-key register history: h.w(1, 0, 2) is write(1) invoked at t=0, returning at
    t=2; end=None means the outcome is unknown."""

    def __init__(self):
        self.ops: list[Op] = []

    def _add(self, f, value, start, end, ok=None, p=None, key="k"):
        self.ops.append(Op(len(self.ops), p if p is not None else len(self.ops), f, key, value, start, end, ok))
        return self

    def w(self, v, start, end, **kw):
        return self._add("write", v, start, end, **kw)

    def r(self, v, start, end, **kw):
        return self._add("read", v, start, end, **kw)

    def cas(self, exp, new, ok, start, end, **kw):
        return self._add("cas", [exp, new], start, end, ok=ok if end is not None else None, **kw)

    def check(self):
        return check_linearizable(self.ops)


# ------------------------------------------------------------------ linearizable: must pass


@pytest.mark.parametrize("name,h", [
    ("empty", H()),
    ("initial read of a missing row", H().r(None, 0, 1)),
    ("sequential", H().w(1, 0, 1).r(1, 2, 3).w(2, 4, 5).r(2, 6, 7)),
    ("concurrent read sees old", H().w(1, 0, 1).w(2, 2, 10).r(1, 3, 4)),
    ("concurrent read sees new", H().w(1, 0, 1).w(2, 2, 10).r(2, 3, 4)),
    ("two reads, new then new", H().w(1, 0, 1).w(2, 2, 10).r(2, 3, 4).r(2, 5, 6)),
    ("overlapping writes in either order", H().w(1, 0, 5).w(2, 1, 6).r(1, 7, 8)),
    ("cas success then read", H().w(0, 0, 1).cas(0, 1, True, 2, 3).r(1, 4, 5)),
    ("cas failure on a mismatch", H().w(5, 0, 1).cas(0, 1, False, 2, 3).r(5, 4, 5)),
    ("cas on a missing row fails", H().cas(0, 1, False, 0, 1).r(None, 2, 3)),
    ("two concurrent cas, one wins", H().w(0, 0, 1).cas(0, 1, True, 2, 5).cas(0, 2, False, 3, 6).r(1, 7, 8)),
    ("cas chain", H().w(0, 0, 1).cas(0, 1, True, 2, 4).cas(1, 2, True, 3, 6).r(2, 7, 8)),
    ("unknown write, never seen", H().w(1, 0, 1).w(2, 2, None).r(1, 3, 4).r(1, 5, 6)),
    ("unknown write, seen later", H().w(1, 0, 1).w(2, 2, None).r(1, 3, 4).r(2, 50, 51)),
    ("unknown write, takes effect long after", H().w(1, 0, 1).w(2, 2, None).w(3, 5, 6).r(3, 7, 8).r(2, 9, 10)),
    ("unknown cas took effect", H().w(0, 0, 1).cas(0, 7, None, 2, None).r(7, 3, 4)),
    ("unknown cas did not", H().w(0, 0, 1).cas(0, 7, None, 2, None).r(0, 3, 4).w(1, 5, 6).r(1, 7, 8)),
    ("unknown read is ignored", H().w(1, 0, 1).r(9, 2, None).r(1, 3, 4)),
    ("many unknown writes of one value", H().w(0, 0, 1).w(1, 2, None).w(1, 2.1, None).w(1, 2.2, None)
        .w(1, 2.3, None).r(0, 3, 4).r(1, 5, 6).w(0, 7, 8).r(1, 9, 10).r(1, 11, 12)),
])
def test_linearizable_histories_pass(name, h):
    res = h.check()
    assert res.valid is True, res.explain()


# ------------------------------------------------------------------ not linearizable: must fail


@pytest.mark.parametrize("name,h", [
    ("stale read after an acknowledged write", H().w(1, 0, 1).w(2, 2, 3).r(1, 4, 5)),
    ("stale read of the initial value", H().w(1, 0, 1).r(None, 2, 3)),
    ("lost write: acknowledged, never visible", H().w(1, 0, 1).w(2, 2, 3).r(2, 4, 5).w(3, 6, 7).r(2, 8, 9)),
    ("read of a value never written", H().w(1, 0, 1).r(7, 2, 3)),
    ("new-old inversion", H().w(1, 0, 1).w(2, 2, 10).r(2, 3, 4).r(1, 5, 6)),
    ("read from the future", H().r(1, 0, 1).w(1, 2, 3)),
    ("two cas from the same value both win", H().w(0, 0, 1).cas(0, 1, True, 2, 5).cas(0, 2, True, 3, 6)),
    ("cas failed though the value matched", H().w(0, 0, 1).cas(0, 1, False, 2, 3).r(0, 4, 5)),
    ("cas won but the write vanished", H().w(0, 0, 1).cas(0, 1, True, 2, 3).r(0, 4, 5)),
    ("cas won on a mismatch", H().w(5, 0, 1).cas(0, 1, True, 2, 3)),
    ("unknown write seen before it was invoked", H().w(1, 0, 1).r(2, 2, 3).w(2, 4, None)),
    ("unknown write applied twice (value reverts and returns)",
     H().w(1, 0, 1).w(2, 2, None).r(2, 3, 4).w(1, 5, 6).r(1, 7, 8).r(2, 9, 10)),
    ("stale read with unknown writes around",
     H().w(1, 0, 1).w(3, 1.5, None).w(2, 2, 3).w(4, 3.5, None).r(1, 5, 6)),
    ("unknown cas cannot explain a value it does not write", H().w(0, 0, 1).cas(0, 7, None, 2, None).r(8, 3, 4)),
    ("unknown cas whose guard never held", H().w(5, 0, 1).cas(0, 7, None, 2, None).r(7, 3, 4)),
])
def test_non_linearizable_histories_fail(name, h):
    res = h.check()
    assert res.valid is False, name
    text = res.explain()
    assert "NOT linearizable" in text and res.stuck, text


def test_violation_report_names_the_stuck_operation():
    h = H().w(1, 0, 1).w(2, 2, 3).r(1, 4, 5)
    res = h.check()
    assert res.valid is False
    assert [op.f for op in res.longest_prefix] == ["write", "write"]
    assert res.final_state == 2
    assert any(op.f == "read" and op.value == 1 for op in res.stuck)
    assert "read -> 1" in res.explain()


def test_keys_are_checked_independently():
    ops = (H().w(1, 0, 1, key="a").r(1, 2, 3, key="a")
              .w(5, 0, 1, key="b").r(None, 2, 3, key="b")).ops  # b: stale
    results = check_registers(ops)
    assert results["a"].valid is True
    assert results["b"].valid is False


def test_step_budget_gives_inconclusive_not_a_verdict():
    h = H().w(0, 0, 1)
    for i in range(14):
        h.w(i % 3, 2 + i * 0.01, None)
    for i in range(10):
        h.r(i % 3, 100 + i, 100.5 + i)
    h.r(99, 200, 201)  # impossible: the search must explore a lot before giving up
    assert h.check().valid is False
    assert check_linearizable(h.ops, max_steps=10).valid is None


# ------------------------------------------------------------------ events -> ops


def test_ops_from_events_pairs_by_process_and_keeps_failures_apart():
    ev = [
        {"process": 0, "type": "invoke", "f": "write", "key": "k", "value": 1, "time": 0},
        {"process": 1, "type": "invoke", "f": "cas", "key": "k", "value": [1, 2], "time": 1},
        {"process": 0, "type": "ok", "f": "write", "key": "k", "value": 1, "time": 2},
        {"process": "nemesis", "type": "info", "f": "kill", "value": "n1", "time": 2.5},
        {"process": 1, "type": "ok", "f": "cas", "key": "k", "value": True, "time": 3},
        {"process": 0, "type": "invoke", "f": "read", "key": "k", "value": None, "time": 4},
        {"process": 0, "type": "ok", "f": "read", "key": "k", "value": 2, "time": 5},
        {"process": 1, "type": "invoke", "f": "write", "key": "k", "value": 9, "time": 6},
        {"process": 1, "type": "fail", "f": "write", "key": "k", "value": 9, "time": 7, "error": "Unavailable"},
        {"process": 2, "type": "invoke", "f": "write", "key": "k", "value": 3, "time": 8},
        {"process": 2, "type": "info", "f": "write", "key": "k", "value": 3, "time": 9},
        {"process": 3, "type": "invoke", "f": "write", "key": "k", "value": 4, "time": 10},
    ]
    ops, failed = ops_from_events(ev)
    assert [(o.f, o.value, o.ok, o.complete) for o in ops] == [
        ("write", 1, None, 2), ("cas", [1, 2], True, 3), ("read", 2, None, 5),
        ("write", 3, None, None), ("write", 4, None, None)]
    assert [f["value"] for f in failed] == [9]
    assert check_linearizable(ops).valid is True


# ------------------------------------------------------------------ agreement with brute force


def _brute_force(ops: list[Op]) -> bool:
    """Try every order of every subset of the unknown ops plus all known ops."""
    model = RegisterModel()
    ops = [o for o in ops if not (o.unknown and o.f == "read")]
    known = [o for o in ops if not o.unknown]
    unknown = [o for o in ops if o.unknown]
    for k in range(len(unknown) + 1):
        for subset in itertools.combinations(unknown, k):
            chosen = known + list(subset)
            for perm in itertools.permutations(chosen):
                ok = True
                # real-time order: a completed op precedes every op invoked after it completed
                for i, a in enumerate(perm):
                    for b in perm[i + 1:]:
                        if b.complete is not None and b.complete < a.invoke:
                            ok = False
                            break
                    if not ok:
                        break
                if not ok:
                    continue
                state = model.init
                for o in perm:
                    legal, state = model.step(state, o)
                    if not legal:
                        ok = False
                        break
                if ok:
                    return True
    return False


def _random_history(rng: random.Random, n: int, corrupt: bool) -> list[Op]:
    """A real register run by concurrent processes (so linearizable), then maybe one result
    corrupted."""
    ops = []
    state = None
    t = 0.0
    pending = []
    for i in range(n):
        t += rng.random()
        f = rng.choice(["read", "write", "cas", "write"])
        start = t - rng.random() * 2
        # the op takes effect at t; it was invoked before and returns after (or never)
        end = None if rng.random() < 0.2 and f != "read" else t + rng.random() * 2
        if f == "read":
            op = Op(i, i, "read", "k", state, start, end)
        elif f == "write":
            v = rng.randrange(3)
            state = v
            op = Op(i, i, "write", "k", v, start, end)
        else:
            exp, new = rng.randrange(3), rng.randrange(3)
            okv = state == exp
            if okv:
                state = new
            op = Op(i, i, "cas", "k", [exp, new], start, end, okv if end is not None else None)
        pending.append(op)
    ops = pending
    if corrupt:
        i = rng.randrange(len(ops))
        o = ops[i]
        if o.f == "read":
            o = Op(o.id, o.process, "read", "k", rng.choice([None, 0, 1, 2]), o.invoke, o.complete)
        elif o.f == "cas" and o.ok is not None:
            o = Op(o.id, o.process, "cas", "k", o.value, o.invoke, o.complete, not o.ok)
        elif o.f == "write":
            o = Op(o.id, o.process, "write", "k", (o.value + 1) % 3, o.invoke, o.complete)
        ops[i] = o
    return ops


def test_agrees_with_brute_force_on_random_small_histories():
    rng = random.Random(20240611)
    seen = {True: 0, False: 0}
    for _ in range(600):
        ops = _random_history(rng, rng.randint(2, 7), corrupt=rng.random() < 0.6)
        expected = _brute_force(ops)
        got = check_linearizable(ops).valid
        assert got is expected, "\n".join(o.describe() for o in ops)
        seen[expected] += 1
    assert seen[True] > 50 and seen[False] > 50, seen


def test_large_history_checks_fast():
    rng = random.Random(1)
    ops = _random_history(rng, 3000, corrupt=False)
    t0 = time.monotonic()
    res = check_linearizable(ops)
    assert res.valid is True, res.explain()
    assert time.monotonic() - t0 < 20


# ------------------------------------------------------------------ set and read-your-writes


def test_set_checker():
    ok = check_set([1, 2, 3], [4, 5], [6], {1: 1, 2: 1, 3: 1, 5: 1})
    assert ok.valid and ok.recovered == 1, ok.explain()
    lost = check_set([1, 2, 3], [], [], {1: 1, 3: 1})
    assert not lost.valid and lost.lost == [2]
    dup = check_set([1, 2], [3], [], {1: 1, 2: 2, 3: 2})
    assert not dup.valid and dup.duplicated == {2: 2, 3: 2}
    phantom = check_set([1], [], [2], {1: 1, 2: 1, 9: 1})
    assert not phantom.valid and phantom.unexpected == [9] and phantom.resurrected == [2]
    assert "lost" in lost.explain() and "duplicated" in dup.explain()


def test_read_your_writes_checker():
    good = [
        {"process": 0, "f": "write", "type": "ok", "value": 1, "index": 5},
        {"process": 0, "f": "read", "type": "ok", "value": 1, "min_index": 5, "index": 5},
        {"process": 0, "f": "write", "type": "info", "value": 2},
        {"process": 0, "f": "read", "type": "ok", "value": 2, "min_index": 5, "index": 9},
        {"process": 0, "f": "read", "type": "ok", "value": 1, "min_index": 5, "index": 6},
        {"process": 1, "f": "read", "type": "ok", "value": None, "min_index": 0, "index": 1},
    ]
    assert check_read_your_writes(good).valid
    bad = good + [
        {"process": 0, "f": "write", "type": "ok", "value": 3, "index": 12},
        {"process": 0, "f": "read", "type": "ok", "value": 2, "min_index": 12, "index": 11},
    ]
    res = check_read_your_writes(bad)
    assert not res.valid and "saw 2, expected 3..3" in res.explain()
