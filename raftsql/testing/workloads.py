"""The fault runs' client workloads: each runs concurrent clients that record every operation in
the History, reads the final state after healing and checks it (raftsql.testing.checker,
raftsql.testing.elle): registers (linearizable), set (no lost or doubled insert), ryw
(read-your-writes on stale reads), bank (serializable transfers keep the total) and append
(Elle's list-append: transactions checked for every isolation anomaly)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

from raftsql.testing import checker, elle
from raftsql.testing.history import Ctx


class Stop(Exception):
    """Raised inside a worker when the run is over."""



def classify(exc: BaseException) -> str:
    """Map a driver exception to a completion type: fail (definitely not applied) or info."""
    from raftsql.driver._client import BadRequest, OutcomeUnknown, Unavailable

    if isinstance(exc, Unavailable | BadRequest):
        return "fail"
    if isinstance(exc, OutcomeUnknown):
        return "info"
    return "info"  # anything unexpected: we do not know what happened


class Workload:
    name = "workload"
    threads = 1

    def setup(self, ctx: Ctx, client) -> None:
        """Create tables (called once, before the clients start)."""

    def worker(self, ctx: Ctx, process: int, rng: random.Random) -> None:
        """Run operations until ctx.stop is set."""

    def final(self, ctx: Ctx) -> None:
        """After healing: read what the checker needs."""

    def check(self, ctx: Ctx) -> dict[str, Any]:
        """{"valid": bool | None, "summary": str, ...}"""
        return {"valid": True, "summary": ""}

    # helpers

    def _retrying(self, ctx: Ctx, fn: Callable[[], Any], deadline_s: float = 60.0) -> Any:
        """Retry a read until it works (after healing, the cluster must recover)."""
        end = time.monotonic() + deadline_s
        last: BaseException | None = None
        while time.monotonic() < end:
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - retried until the deadline
                last = e
                time.sleep(0.2)
        raise RuntimeError(f"{self.name}: final read did not succeed within {deadline_s}s: {last!r}")

    def _until_ok(self, ctx: Ctx, op: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A recorded final operation, repeated until one ends "ok" (the failed ones stay in
        the history too)."""
        def once() -> dict[str, Any]:
            ev = op()
            if ev["type"] != "ok":
                raise RuntimeError(ev.get("error"))
            return ev

        return self._retrying(ctx, once)


def _sql_error(result: dict[str, Any]) -> str | None:
    err = result.get("error")
    return None if err is None else f"{err.get('name')}: {err.get('message')}"


class RegisterWorkload(Workload):
    """Per-key registers: read, write, compare-and-set; checked for linearizability.

    Keys rotate (Jepsen's independent keys): a few keys are active at a time and each retires
    after ops_per_key operations, which bounds the search per key (unknown writes stay
    concurrent with everything after them)."""

    name = "register"

    def __init__(self, threads: int = 4, active_keys: int = 2, ops_per_key: int = 120, values: int = 5):
        self.threads = threads
        self.active_keys = active_keys
        self.ops_per_key = ops_per_key
        self.values = values
        self._lock = threading.Lock()
        self._next_key = 0
        self._active: list[str] = []
        self._counts: dict[str, int] = {}
        self.keys: list[str] = []

    def _key(self, rng: random.Random) -> str:
        with self._lock:
            while len(self._active) < self.active_keys:
                k = f"r{self._next_key}"
                self._next_key += 1
                self._active.append(k)
                self.keys.append(k)
                self._counts[k] = 0
            k = rng.choice(self._active)
            self._counts[k] += 1
            if self._counts[k] >= self.ops_per_key:
                self._active.remove(k)
            return k

    def setup(self, ctx: Ctx, client) -> None:
        r = client.execute([("CREATE TABLE IF NOT EXISTS reg (k TEXT PRIMARY KEY, v INTEGER)", [])])
        assert r.get("error") is None, r

    def worker(self, ctx: Ctx, process: int, rng: random.Random) -> None:
        timeout = ctx.timeout_for(process)
        c = ctx.cluster.client(timeout=timeout)
        # Half the reads go to a random node through a client bound to it (as Jepsen binds
        # clients to nodes): follower reads take the ReadIndex path through the leader, and a
        # node cut off from the leader must not answer from its own state.
        readers = {n: ctx.cluster.node_client(n, timeout=min(timeout, 1.5)) for n in ctx.cluster.ids}
        try:
            while not ctx.stop.is_set():
                key = self._key(rng)
                x = rng.random()
                if x < 0.25:
                    self.op(ctx, c, process, "read", key, None)
                elif x < 0.5:
                    node = rng.choice(ctx.cluster.ids)
                    self.op(ctx, readers[node], process, "read", key, None, node=node)
                elif x < 0.75:
                    self.op(ctx, c, process, "write", key, rng.randrange(self.values))
                else:
                    self.op(ctx, c, process, "cas", key, [rng.randrange(self.values), rng.randrange(self.values)])
        finally:
            c.close()
            for r in readers.values():
                r.close()

    def op(self, ctx: Ctx, c, process: Any, f: str, key: str, value: Any, **extra: Any) -> dict[str, Any]:
        h = ctx.history
        h.record(process=process, type="invoke", workload=self.name, f=f, key=key, value=value, **extra)
        try:
            if f == "read":
                r = c.execute([("SELECT v FROM reg WHERE k=?", [key])])
            elif f == "write":
                r = c.execute([("INSERT OR REPLACE INTO reg (k, v) VALUES (?, ?)", [key, value])])
            else:
                r = c.execute([("UPDATE reg SET v=? WHERE k=? AND v=?", [value[1], key, value[0]])])
        except Exception as e:  # noqa: BLE001 - every outcome goes into the history
            return h.record(process=process, type=classify(e), workload=self.name, f=f, key=key,
                            value=value, error=f"{type(e).__name__}: {e}", **extra)
        err = _sql_error(r)
        if err is not None:
            return h.record(process=process, type="fail", workload=self.name, f=f, key=key, value=value,
                            error=err, index=r.get("index"), **extra)
        if f == "read":
            out = r["rows"][0][0] if r["rows"] else None
        elif f == "cas":
            out = r["rowcount"] == 1
        else:
            out = value
        return h.record(process=process, type="ok", workload=self.name, f=f, key=key, value=out,
                        index=r.get("index"), dup=r.get("duplicate") or None, **extra)

    def final(self, ctx: Ctx) -> None:
        c = ctx.cluster.client(timeout=10)
        try:
            for key in self.keys:
                self._until_ok(ctx, lambda key=key: self.op(ctx, c, "final-register", "read", key, None))
        finally:
            c.close()

    def check(self, ctx: Ctx) -> dict[str, Any]:
        events = [e for e in ctx.history.events if e.get("workload") == self.name]
        ops, failed = checker.ops_from_events(events)
        t0 = time.monotonic()
        results = checker.check_registers(ops)
        elapsed = time.monotonic() - t0
        bad = [r for r in results.values() if r.valid is False]
        unknown = [r for r in results.values() if r.valid is None]
        counts = _count_types(events)
        summary = (f"register: {len(results)} keys, {counts} ; checked in {elapsed:.2f}s; "
                   f"{len(bad)} non-linearizable, {len(unknown)} inconclusive")
        return {
            "valid": False if bad else (None if unknown else True),
            "summary": summary,
            "explain": "\n".join([r.explain() for r in (bad + unknown)[:3]]
                                 + ([f"... and {len(bad) + len(unknown) - 3} more keys"] if len(bad) + len(unknown) > 3 else [])),
            "counts": counts,
            "keys": len(results),
            "check_s": round(elapsed, 3),
            "max_steps": max((r.steps for r in results.values()), default=0),
        }


def _count_types(events: list[dict[str, Any]]) -> dict[str, int]:
    out = {"ok": 0, "fail": 0, "info": 0}
    for e in events:
        if e.get("type") in out:
            out[e["type"]] += 1
    return out


class SetWorkload(Workload):
    """Concurrent unique inserts into a table without a UNIQUE constraint; after healing,
    every acknowledged insert is present exactly once (a duplicate apply would show)."""

    name = "set"

    def __init__(self, threads: int = 2, retry_unknown: bool = False):
        self.threads = threads
        self.retry_unknown = retry_unknown  # resend an unknown insert with its serial (jetcd)
        self.final_counts: dict[int, int] = {}

    def setup(self, ctx: Ctx, client) -> None:
        r = client.execute([("CREATE TABLE IF NOT EXISTS sset (id INTEGER PRIMARY KEY, v INTEGER)", [])])
        assert r.get("error") is None, r

    def worker(self, ctx: Ctx, process: int, rng: random.Random) -> None:
        from raftsql.driver._client import OutcomeUnknown

        c = ctx.cluster.client(timeout=ctx.timeout_for(process))
        seq = 0
        try:
            while not ctx.stop.is_set():
                seq += 1
                v = process * 10_000_000 + seq
                serial = None
                while True:
                    ctx.history.record(process=process, type="invoke", workload=self.name, f="add", value=v,
                                       serial=serial)
                    try:
                        r = c.execute([("INSERT INTO sset (v) VALUES (?)", [v])], serial=serial)
                    except OutcomeUnknown as e:
                        ctx.history.record(process=process, type="info", workload=self.name, f="add", value=v,
                                           error=str(e), serial=e.serial)
                        if self.retry_unknown and not ctx.stop.is_set():
                            serial = e.serial
                            continue
                        break
                    except Exception as e:  # noqa: BLE001
                        ctx.history.record(process=process, type=classify(e), workload=self.name, f="add",
                                           value=v, error=f"{type(e).__name__}: {e}")
                        break
                    err = _sql_error(r)
                    ctx.history.record(process=process, type="fail" if err else "ok", workload=self.name,
                                       f="add", value=v, error=err, index=r.get("index"),
                                       dup=r.get("duplicate") or None)
                    break
        finally:
            c.close()

    def final(self, ctx: Ctx) -> None:
        c = ctx.cluster.client(timeout=15)
        try:
            def read():
                r = c.execute([("SELECT v, count(*) FROM sset GROUP BY v", [])])
                if r.get("error"):
                    raise RuntimeError(r["error"])
                return r

            r = self._retrying(ctx, read)
            self.final_counts = {row[0]: row[1] for row in r["rows"]}
            ctx.history.record(process="final-set", type="ok", workload="set-final", f="read-all",
                               value=len(self.final_counts), index=r.get("index"))
        finally:
            c.close()

    def outcome(self, ctx: Ctx) -> checker.SetResult:
        status: dict[int, str] = {}
        for e in ctx.history.events:
            if e.get("workload") != self.name or e.get("type") == "invoke":
                continue
            v, t = e["value"], e["type"]
            # Across resends of one value the strongest outcome wins: ok > info > fail.
            rank = {"fail": 0, "info": 1, "ok": 2}
            if v not in status or rank[t] > rank[status[v]]:
                status[v] = t
        ack = [v for v, t in status.items() if t == "ok"]
        unk = [v for v, t in status.items() if t == "info"]
        fail = [v for v, t in status.items() if t == "fail"]
        return checker.check_set(ack, unk, fail, self.final_counts)

    def check(self, ctx: Ctx) -> dict[str, Any]:
        res = self.outcome(ctx)
        return {"valid": res.valid, "summary": res.explain().splitlines()[0],
                "explain": "" if res.valid else res.explain(),
                "counts": {"ok": res.acknowledged, "info": res.unknown, "fail": res.failed},
                "recovered": res.recovered}


class ReadYourWritesWorkload(Workload):
    """Each process writes increasing values to its own key through the leader, then reads it
    with consistency="stale" and min_index = that write's index from a random node."""

    name = "ryw"

    def __init__(self, threads: int = 2):
        self.threads = threads

    def setup(self, ctx: Ctx, client) -> None:
        r = client.execute([("CREATE TABLE IF NOT EXISTS ryw (k TEXT PRIMARY KEY, v INTEGER)", [])])
        assert r.get("error") is None, r

    def worker(self, ctx: Ctx, process: int, rng: random.Random) -> None:
        c = ctx.cluster.client(timeout=ctx.op_timeout)
        readers = {n: ctx.cluster.node_client(n, timeout=min(2.0, ctx.op_timeout)) for n in ctx.cluster.ids}
        key = f"c{process}"
        seq = 0
        last_index = 0
        h = ctx.history
        try:
            while not ctx.stop.is_set():
                seq += 1
                h.record(process=process, type="invoke", workload=self.name, f="write", key=key, value=seq)
                try:
                    r = c.execute([("INSERT OR REPLACE INTO ryw (k, v) VALUES (?, ?)", [key, seq])])
                except Exception as e:  # noqa: BLE001
                    h.record(process=process, type=classify(e), workload=self.name, f="write", key=key, value=seq,
                             error=f"{type(e).__name__}: {e}")
                    continue
                err = _sql_error(r)
                h.record(process=process, type="fail" if err else "ok", workload=self.name, f="write", key=key,
                         value=seq, index=r.get("index"), error=err)
                if err is None:
                    last_index = max(last_index, r["index"])
                for _ in range(2):
                    node = rng.choice(ctx.cluster.ids)
                    h.record(process=process, type="invoke", workload=self.name, f="read", key=key,
                             value=None, min_index=last_index, node=node)
                    try:
                        rr = readers[node].execute([("SELECT v FROM ryw WHERE k=?", [key])],
                                                   consistency="stale", min_index=last_index)
                    except Exception as e:  # noqa: BLE001
                        h.record(process=process, type=classify(e), workload=self.name, f="read", key=key,
                                 value=None, error=f"{type(e).__name__}: {e}", node=node)
                        continue
                    err = _sql_error(rr)
                    h.record(process=process, type="fail" if err else "ok", workload=self.name, f="read",
                             key=key, value=rr["rows"][0][0] if rr.get("rows") else None, error=err,
                             index=rr.get("index"), min_index=last_index, node=node)
        finally:
            c.close()
            for rc in readers.values():
                rc.close()

    def check(self, ctx: Ctx) -> dict[str, Any]:
        events = [e for e in ctx.history.events if e.get("workload") == self.name and e.get("type") != "invoke"]
        res = checker.check_read_your_writes(events)
        counts = _count_types(events)
        return {"valid": res.valid, "summary": f"ryw: {counts}; " + res.explain().splitlines()[0],
                "explain": "" if res.valid else res.explain(), "counts": counts}


class BankWorkload(Workload):
    """Transfers between accounts in serializable interactive transactions, through the DB-API
    driver: BEGIN; read both balances; write both as absolute values (a read-then-write that
    would lose updates without the commit check); log the transfer; COMMIT. Other operations
    read every balance in one statement. Checked: every successful read sees the initial total;
    the log holds each transfer at most once (no UNIQUE constraint, so a double apply would
    show), every acknowledged transfer and no failed one; and the final balances are the
    initial ones plus exactly the logged transfers (a lost update would break that)."""

    name = "bank"

    def __init__(self, threads: int = 4, accounts: int = 8, balance: int = 100):
        self.threads = threads
        self.accounts = accounts
        self.balance = balance
        self.final_balances: list[int] = []
        self.final_log: list[tuple[int, int, int, int]] = []

    @property
    def total(self) -> int:
        return self.accounts * self.balance

    def setup(self, ctx: Ctx, client) -> None:
        for sql, params in [
            ("CREATE TABLE IF NOT EXISTS bank (id INTEGER PRIMARY KEY, bal INTEGER NOT NULL)", []),
            ("CREATE TABLE IF NOT EXISTS bank_log (tid INTEGER, src INTEGER, dst INTEGER, amount INTEGER)", []),
        ]:
            r = client.execute([(sql, params)])
            assert r.get("error") is None, r
        r = client.execute([("INSERT INTO bank (id, bal) VALUES (?, ?)", [i, self.balance])
                            for i in range(self.accounts)])
        assert r.get("error") is None, r

    def worker(self, ctx: Ctx, process: int, rng: random.Random) -> None:
        from raftsql.driver import _connection

        conn = _connection.Connection(ctx.cluster.client(timeout=ctx.timeout_for(process)), autocommit=True)
        seq = 0
        try:
            while not ctx.stop.is_set():
                if rng.random() < 0.25:
                    self._read(ctx, conn, process)
                    continue
                seq += 1
                self._transfer(ctx, conn, process, process * 10_000_000 + seq, rng)
        finally:
            conn.close()

    def _read(self, ctx: Ctx, conn, process: int) -> None:
        h = ctx.history
        h.record(process=process, type="invoke", workload=self.name, f="read", value=None)
        try:
            rows = conn.execute("SELECT id, bal FROM bank ORDER BY id").fetchall()
        except Exception as e:  # noqa: BLE001 - a read that failed changed nothing
            h.record(process=process, type="fail", workload=self.name, f="read", value=None,
                     error=f"{type(e).__name__}: {e}")
            return
        h.record(process=process, type="ok", workload=self.name, f="read", value=[b for _, b in rows],
                 index=conn.last_index)

    def _transfer(self, ctx: Ctx, conn, process: int, tid: int, rng: random.Random) -> None:
        import raftsql.driver as db

        h = ctx.history
        src, dst = rng.sample(range(self.accounts), 2)
        h.record(process=process, type="invoke", workload=self.name, f="transfer", value=tid, src=src, dst=dst)
        stage = "body"
        try:
            conn.execute("BEGIN")
            a = conn.execute("SELECT bal FROM bank WHERE id = ?", (src,)).fetchone()[0]
            b = conn.execute("SELECT bal FROM bank WHERE id = ?", (dst,)).fetchone()[0]
            amount = rng.randint(1, max(1, min(a, 20)))
            if a < amount:  # an empty account: nothing to move
                conn.execute("ROLLBACK")
                h.record(process=process, type="fail", workload=self.name, f="transfer", value=tid, error="empty")
                return
            conn.execute("UPDATE bank SET bal = ? WHERE id = ?", (a - amount, src))
            conn.execute("UPDATE bank SET bal = ? WHERE id = ?", (b + amount, dst))
            conn.execute("INSERT INTO bank_log (tid, src, dst, amount) VALUES (?, ?, ?, ?)", (tid, src, dst, amount))
            stage = "commit"
            conn.execute("COMMIT")
        except db.OutcomeUnknown as e:
            self._resend(ctx, conn, process, tid, e)
            return
        except Exception as e:  # noqa: BLE001
            # SerializationError, TransactionAborted, Unavailable, an SQL error: nothing applied.
            kind = "fail" if isinstance(e, db.Error) and not isinstance(e, db.InterfaceError) else "info"
            h.record(process=process, type=kind, workload=self.name, f="transfer", value=tid, stage=stage,
                     error=f"{type(e).__name__}: {e}")
            conn.rollback()
            return
        h.record(process=process, type="ok", workload=self.name, f="transfer", value=tid, index=conn.last_index)

    def _resend(self, ctx: Ctx, conn, process: int, tid: int, error) -> None:
        """An unknown commit is resent with its serial (and its transaction check) until the
        cluster answers: the session table says whether the first attempt applied."""
        import raftsql.driver as db

        h = ctx.history
        h.record(process=process, type="info", workload=self.name, f="transfer", value=tid, error=str(error),
                 serial=error.serial)
        for _ in range(20):
            try:
                cur = conn.resend(error)
            except db.OutcomeUnknown as e:
                error = e
                continue
            except db.Unavailable:
                # This resend reached no node: it says nothing about the first attempt.
                time.sleep(0.1)
                continue
            except db.Error as e:  # the stored or a new outcome: not applied
                h.record(process=process, type="fail", workload=self.name, f="transfer", value=tid,
                         stage="resend", error=f"{type(e).__name__}: {e}")
                return
            h.record(process=process, type="ok", workload=self.name, f="transfer", value=tid, stage="resend",
                     dup=cur._result.get("duplicate") or None)
            return

    def final(self, ctx: Ctx) -> None:
        c = ctx.cluster.client(timeout=15)
        try:
            def read(sql):
                def go():
                    r = c.execute([(sql, [])])
                    if r.get("error"):
                        raise RuntimeError(r["error"])
                    return r["rows"]
                return go

            self.final_balances = [b for _, b in self._retrying(ctx, read("SELECT id, bal FROM bank ORDER BY id"))]
            self.final_log = [tuple(r) for r in self._retrying(ctx, read("SELECT tid, src, dst, amount FROM bank_log"))]
            ctx.history.record(process="final-bank", type="ok", workload="bank-final", f="read-all",
                               value={"balances": self.final_balances, "log": len(self.final_log)})
        finally:
            c.close()

    def check(self, ctx: Ctx) -> dict[str, Any]:
        events = [e for e in ctx.history.events if e.get("workload") == self.name and e.get("type") != "invoke"]
        problems: list[str] = []
        reads = [e for e in events if e["f"] == "read" and e["type"] == "ok"]
        for e in reads:
            if sum(e["value"]) != self.total:
                problems.append(f"read at index {e.get('index')} saw total {sum(e['value'])} != {self.total}: {e['value']}")
        status: dict[int, str] = {}
        rank = {"fail": 0, "info": 1, "ok": 2}
        for e in events:
            if e["f"] == "transfer" and (e["value"] not in status or rank[e["type"]] > rank[status[e["value"]]]):
                status[e["value"]] = e["type"]
        counts: dict[int, int] = {}
        for tid, *_ in self.final_log:
            counts[tid] = counts.get(tid, 0) + 1
        res = checker.check_set([t for t, s in status.items() if s == "ok"],
                                [t for t, s in status.items() if s == "info"],
                                [t for t, s in status.items() if s == "fail"], counts)
        if not res.valid:
            problems.append(res.explain())
        expected = [self.balance] * self.accounts
        for _, src, dst, amount in self.final_log:
            expected[src] -= amount
            expected[dst] += amount
        if self.final_balances != expected:
            problems.append(f"final balances {self.final_balances} != initial + logged transfers {expected}")
        if sum(self.final_balances) != self.total:
            problems.append(f"final total {sum(self.final_balances)} != {self.total}")
        transfers = _count_types([e for e in events if e["f"] == "transfer"])
        conflicts = sum(1 for e in events if e["f"] == "transfer" and e["type"] == "fail"
                        and "SerializationError" in str(e.get("error")))
        summary = (f"bank: transfers {transfers}, {conflicts} serialization failures, {len(reads)} reads "
                   f"all totalling {self.total}, {len(self.final_log)} logged")
        return {"valid": not problems, "summary": summary if not problems else "bank: INVALID",
                "explain": "\n".join(problems), "counts": transfers, "reads": len(reads),
                "conflicts": conflicts}


class AppendWorkload(Workload):
    """Jepsen Elle's list-append workload through the DB-API driver: each transaction (BEGIN ...
    COMMIT) runs 1 to max_ops micro-operations on a few hot keys, each a read of a key's list
    or an append of a value unique to that key. After healing one transaction reads every key,
    and elle.check looks for every isolation anomaly (G0, G1a-c, G-single, G2, and with
    realtime=True the ones only real time reveals: strict serializability).

    A list is a TEXT of comma-separated values in `lists`; an append is an upsert that extends
    it, so it reads nothing the client sees (its rowcount is always 1). Keys rotate: `active`
    are in use at once and each retires after max_appends appends, which keeps lists short.
    Half the transactions (drawn per transaction) run in the driver's pipeline mode: their
    appends are sent unchecked with the COMMIT, or before the next read."""

    name = "append"

    def __init__(self, threads: int = 4, active: int = 6, max_ops: int = 4,
                 max_appends: int = 64, realtime: bool = True):
        self.threads = threads
        self.active = active
        self.max_ops = max_ops
        self.max_appends = max_appends
        self.realtime = realtime
        self._lock = threading.Lock()
        self._keys: list[int] = list(range(active))
        self._next_key = active
        self._appends: dict[int, int] = {}
        self._next_value = 0
        self.all_keys: set[int] = set(self._keys)

    def setup(self, ctx: Ctx, client) -> None:
        r = client.execute([("CREATE TABLE IF NOT EXISTS lists (k INTEGER PRIMARY KEY, v TEXT NOT NULL)", [])])
        assert r.get("error") is None, r

    def _ops(self, rng: random.Random) -> list[list[Any]]:
        with self._lock:
            ops = []
            for _ in range(rng.randint(1, self.max_ops)):
                k = rng.choice(self._keys)
                if rng.random() < 0.5:
                    ops.append(["r", k, None])
                    continue
                self._next_value += 1
                ops.append(["append", k, self._next_value])
                self._appends[k] = self._appends.get(k, 0) + 1
                if self._appends[k] >= self.max_appends and k in self._keys:
                    self._keys.remove(k)
                    self._keys.append(self._next_key)
                    self.all_keys.add(self._next_key)
                    self._next_key += 1
            return ops

    def worker(self, ctx: Ctx, process: int, rng: random.Random) -> None:
        from raftsql.driver import _connection

        conn = _connection.Connection(ctx.cluster.client(timeout=ctx.timeout_for(process)), autocommit=True)
        try:
            while not ctx.stop.is_set():
                self.transaction(ctx, conn, process, self._ops(rng), pipeline=rng.random() < 0.5)
        finally:
            conn.close()

    @staticmethod
    def _read(conn, k: int) -> list[int]:
        row = conn.execute("SELECT v FROM lists WHERE k = ?", (k,)).fetchone()
        return [int(x) for x in row[0].split(",")] if row else []

    def transaction(self, ctx: Ctx, conn, process: Any, ops: list[list[Any]],
                    pipeline: bool = False) -> dict[str, Any]:
        import contextlib

        import raftsql.driver as db

        h = ctx.history
        h.record(process=process, type="invoke", workload=self.name, f="txn", value=ops)
        done: list[list[Any]] = []
        try:
            with conn.pipeline() if pipeline else contextlib.nullcontext():
                conn.execute("BEGIN")
                for f, k, v in ops:
                    if f == "r":
                        done.append(["r", k, self._read(conn, k)])
                    else:
                        conn.execute("INSERT INTO lists (k, v) VALUES (?, ?) ON CONFLICT (k) "
                                     "DO UPDATE SET v = v || ',' || excluded.v", (k, str(v)))
                        done.append(["append", k, v])
                conn.execute("COMMIT")
        except db.OutcomeUnknown as e:
            return self._resend(ctx, conn, process, done, e)
        except Exception as e:  # noqa: BLE001
            # SerializationError, TransactionAborted, Unavailable, an SQL error: nothing of it
            # was applied (a transaction applies only as its one commit entry).
            kind = "fail" if isinstance(e, db.Error) and not isinstance(e, db.InterfaceError) else "info"
            conn.rollback()
            return h.record(process=process, type=kind, workload=self.name, f="txn", value=ops,
                            error=f"{type(e).__name__}: {e}")
        return h.record(process=process, type="ok", workload=self.name, f="txn", value=done,
                        index=conn.last_index)

    def _resend(self, ctx: Ctx, conn, process: Any, done: list[list[Any]], error) -> dict[str, Any]:
        """The commit's outcome is unknown: resend it with its serial (and its checks) until
        the cluster answers; the session table says whether the first attempt applied."""
        import raftsql.driver as db

        h = ctx.history
        for _ in range(20):
            try:
                conn.resend(error)
            except db.OutcomeUnknown as e:
                error = e
                continue
            except db.Unavailable:
                # This resend reached no node: it says nothing about the first attempt.
                time.sleep(0.1)
                continue
            except db.Error as e:  # the stored or a new outcome: not applied
                return h.record(process=process, type="fail", workload=self.name, f="txn", value=done,
                                stage="resend", error=f"{type(e).__name__}: {e}")
            return h.record(process=process, type="ok", workload=self.name, f="txn", value=done,
                            stage="resend")
        return h.record(process=process, type="info", workload=self.name, f="txn", value=done,
                        error=str(error))

    def final(self, ctx: Ctx) -> None:
        from raftsql.driver import _connection

        conn = _connection.Connection(ctx.cluster.client(timeout=10), autocommit=True)
        keys = sorted(self.all_keys)
        try:
            self._until_ok(ctx, lambda: self.transaction(ctx, conn, "final-append",
                                                         [["r", k, None] for k in keys]))
        finally:
            conn.close()

    def check(self, ctx: Ctx) -> dict[str, Any]:
        events = [e for e in ctx.history.events if e.get("workload") == self.name]
        txns = elle.from_events(events)
        t0 = time.monotonic()
        res = elle.check(txns, realtime=self.realtime)
        elapsed = time.monotonic() - t0
        counts = _count_types(events)
        summary = (f"append: {counts} transactions, {res.committed} committed, edges {res.edges}; "
                   f"anomalies {res.counts or 'none'}; checked in {elapsed:.2f}s")
        return {"valid": res.valid, "summary": summary, "explain": "" if res.valid else res.explain(),
                "counts": counts, "anomalies": res.counts, "edges": res.edges,
                "check_s": round(elapsed, 3)}


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "register": RegisterWorkload,
    "set": SetWorkload,
    "ryw": ReadYourWritesWorkload,
    "bank": BankWorkload,
    "append": AppendWorkload,
}
