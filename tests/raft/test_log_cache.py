"""Bounded log memory: the core keeps the terms of every entry but the data of only
the unstable entries and a bounded cache of durable ones; older entries come back through the
LogReader (raftsql/raft/storage.py), here the simulator's MemDisk or a counting double."""

from __future__ import annotations

import random
import tracemalloc

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from raftsql.raft.core import Config, Raft
from raftsql.raft.log import ENTRY_OVERHEAD, LogInvariantError, RaftLog, cost
from raftsql.raft.storage import limit_size
from raftsql.raft.types import (
    ConfChange,
    ConfChangeType,
    Entry,
    EntryType,
    HardState,
    Message,
    MsgType,
    Role,
    SnapshotMeta,
)
from raftsql.sim.disk import MemDisk
from raftsql.sim.net import SyncNet

IDS3 = ("n1", "n2", "n3")


class CountingDisk(MemDisk):
    """A MemDisk that counts the bytes it hands out, and can be told to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes_read = 0
        self.calls = 0
        self.fail: BaseException | None = None

    def read_entries(self, lo, hi, max_bytes=None):
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        out = super().read_entries(lo, hi, max_bytes)
        self.bytes_read += sum(len(e.data) for e in out)
        return out


def persist(log: RaftLog, disk: MemDisk) -> None:
    """Carry out the log's part of a Ready: write the unstable entries, sync, acknowledge."""
    unstable = log.unstable()
    if unstable:
        disk.append(unstable)
        disk.sync()
        log.stable_to(unstable[-1].index, unstable[-1].term)


def blob(rng: random.Random, index: int, size: int) -> bytes:
    return index.to_bytes(4, "big") + rng.randbytes(size)


# --------------------------------------------------------------------------- the cache itself


def test_cache_never_exceeds_its_bound_while_the_log_grows_far_beyond_it():
    rng = random.Random(1)
    bound = 20_000
    disk = MemDisk()
    log = RaftLog(SnapshotMeta(), [], 0, disk, bound)
    written: list[Entry] = []
    term = 1
    while sum(len(e.data) for e in written) < 200 * bound:  # 200 times the bound
        batch = [
            Entry(term, len(written) + 1 + k, EntryType.NORMAL, blob(rng, len(written) + 1 + k, rng.randrange(3000)))
            for k in range(rng.randint(1, 6))
        ]
        log.append(batch)
        written.extend(batch)
        assert log.cached_bytes() <= bound
        persist(log, disk)
        assert log.cached_bytes() <= bound
        assert log.resident_bytes() == log.cached_bytes() <= bound  # nothing unstable left
        if rng.random() < 0.05:
            term += 1
    assert len(written) > 1000
    # Read back, whole and in pieces, exactly as written.
    assert log.entries == written
    for e in written:
        assert log.entry(e.index) == e
        assert log.term(e.index) == e.term
    for _ in range(300):
        lo = rng.randint(1, len(written))
        hi = rng.randint(lo, len(written) + 1)
        cap = rng.choice([None, 0, 100, 5000, 50_000])
        assert log.slice(lo, hi, cap) == limit_size(written[lo - 1 : hi - 1], cap)
    assert log.cached_bytes() <= bound  # reads never fill the cache
    assert disk.reads > 0


def test_unstable_entries_stay_in_memory_until_durable():
    disk = MemDisk()
    log = RaftLog(SnapshotMeta(), [], 0, disk, 0)  # a cache of nothing
    es = [Entry(1, i, EntryType.NORMAL, b"x" * 1000) for i in range(1, 11)]
    log.append(es)
    # Nothing is on disk yet, so nothing may leave memory, whatever the bound.
    assert log.unstable() == es
    assert log.resident_bytes() == sum(cost(e) for e in es)
    assert log.cached_bytes() == 0
    assert log.slice(1, 11) == es and disk.reads == 0
    persist(log, disk)
    assert log.resident_bytes() == 0 and log.stable == 10
    assert log.slice(1, 11) == es and disk.reads == 10


def test_term_lookups_never_touch_the_disk():
    disk = CountingDisk()
    terms = [1] * 50 + [2] * 30 + [5] * 20
    log = RaftLog(SnapshotMeta(), [], 0, disk, 0)
    log.append([Entry(t, i, EntryType.NORMAL, b"d%d" % i) for i, t in enumerate(terms, 1)])
    persist(log, disk)
    assert log.resident_bytes() == 0
    for i, t in enumerate(terms, 1):
        assert log.term(i) == t
    assert log.last_term() == 5
    assert log.is_up_to_date(100, 5) and not log.is_up_to_date(99, 5) and log.is_up_to_date(1, 6)
    assert log.first_index_of_term(70) == 51
    assert log.last_index_of_term(2, 100) == 80
    assert log.last_index_of_term(3, 100) is None
    assert log.find_conflict([Entry(2, 80), Entry(3, 81)]) == 81
    assert disk.calls == 0


def test_a_store_that_disagrees_with_the_term_index_is_an_invariant_error():
    disk = MemDisk()
    log = RaftLog(SnapshotMeta(), [], 0, disk, 0)
    log.append([Entry(1, i) for i in range(1, 6)])
    persist(log, disk)
    disk.entries[2] = Entry(7, 3)  # a store that lost track of what it holds
    with pytest.raises(LogInvariantError, match="store returned 3:7"):
        log.slice(1, 6)
    assert isinstance(log.failed, LogInvariantError)


class LogCacheMachine(RuleBasedStateMachine):
    """Random appends (with truncations), syncs, commits, compactions and snapshot installs on
    a RaftLog with a tiny cache and a MemDisk, against a plain list: the log must always read
    back exactly the model, and never hold more than its bound of durable data."""

    @initialize(bound=st.sampled_from([0, 1, ENTRY_OVERHEAD + 5, 600, 5000]))
    def open(self, bound):
        self.bound = bound
        self.disk = MemDisk()
        self.log = RaftLog(SnapshotMeta(), [], 0, self.disk, bound)
        self.model: list[Entry] = []  # every live entry
        self.snap = SnapshotMeta()
        self.seq = 0

    def entries(self, first, n, term):
        self.seq += 1
        return [Entry(term, i, EntryType(i % 2 if i % 7 == 0 else 0), b"%d/%d" % (self.seq, i) * (i % 9))
                for i in range(first, first + n)]

    @rule(data=st.data(), n=st.integers(1, 5), term_up=st.integers(0, 2))
    def append(self, data, n, term_up):
        log = self.log
        first = data.draw(st.integers(log.committed + 1, log.last_index() + 1))
        term = max(log.last_term(), 1) + term_up
        es = self.entries(first, n, term)
        log.append(es)
        del self.model[first - self.snap.index - 1 :]
        self.model.extend(es)

    @rule()
    def sync(self):
        persist(self.log, self.disk)

    @rule(data=st.data())
    def commit_and_apply(self, data):
        log = self.log
        if log.stable > log.committed:
            log.commit_to(data.draw(st.integers(log.committed, log.stable)))
            log.applied = log.committed

    @precondition(lambda self: self.log.applied > self.log.snapshot.index)
    @rule(data=st.data())
    def compact(self, data):
        log = self.log
        index = data.draw(st.integers(log.snapshot.index + 1, min(log.applied, log.stable)))
        meta = SnapshotMeta(index, log.term(index))
        log.compact(meta)
        self.disk.compact(meta)
        self.disk.sync()
        del self.model[: index - self.snap.index]
        self.snap = meta

    @rule(gap=st.integers(0, 3))
    def install(self, gap):
        meta = SnapshotMeta(self.log.last_index() + gap, self.log.last_term() + 1)
        self.log.restore(meta)
        self.disk.install(meta)
        self.disk.sync()
        self.model = []
        self.snap = meta

    @rule(data=st.data(), cap=st.sampled_from([None, 0, 50, 400]))
    def read_slice(self, data, cap):
        log = self.log
        if log.last_index() < log.first_index():
            return
        lo = data.draw(st.integers(log.first_index(), log.last_index()))
        hi = data.draw(st.integers(lo, log.last_index() + 1))
        base = self.snap.index + 1
        assert log.slice(lo, hi, cap) == limit_size(self.model[lo - base : hi - base], cap)

    @invariant()
    def matches_the_model(self):
        log = self.log
        assert log.cached_bytes() <= self.bound
        assert log.last_index() == self.snap.index + len(self.model)
        assert log.entries == self.model
        for e in self.model:
            assert log.term(e.index) == e.term
        assert log.conf_changes(log.last_index()) == [e for e in self.model if e.type == EntryType.CONF_CHANGE]
        assert log.unstable() == self.model[log.stable - self.snap.index :]


TestLogCacheMachine = LogCacheMachine.TestCase
TestLogCacheMachine.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# --------------------------------------------------------------------------- the core


def test_lagging_follower_gets_old_entries_from_the_leaders_disk():
    bound = 4 * (ENTRY_OVERHEAD + 500)  # a few entries
    net = SyncNet(IDS3, log_cache_bytes=bound)
    leader = net.elect("n1")
    net.isolate("n3")
    for i in range(60):
        net.propose("n1", b"%03d" % i + b"." * 500)
    assert leader.log.cached_bytes() <= bound
    lag = net["n3"].log.last_index()
    assert leader.log.last_index() - lag >= 60
    reads = net.disks["n1"].reads
    net.heal()
    for _ in range(40):
        net.tick("n1")
        net.deliver()
    assert net.log_of("n3") == net.log_of("n1")
    assert net.disks["n1"].reads - reads >= 60  # every missing entry came from the disk
    assert [e.data for e in net.applied["n3"]] == [e.data for e in net.applied["n1"]]
    for nid in IDS3:
        assert net[nid].log.cached_bytes() <= bound


def test_membership_changes_survive_eviction_and_restart():
    net = SyncNet(IDS3 + ("n4",), log_cache_bytes=0, voters=IDS3)
    leader = net.elect("n1")
    leader.propose(ConfChange(ConfChangeType.ADD_LEARNER, "n4").encode(), EntryType.CONF_CHANGE)
    net.deliver()
    for i in range(5):
        net.propose("n1", b"w%d" % i)
    assert net["n1"].learners == {"n4"}
    assert net["n1"].log.resident_bytes() == 0
    reads = net.disks["n1"].reads
    net.crash("n1")
    core = net.start("n1")
    assert core.learners == {"n4"} and net.disks["n1"].reads == reads  # from memory, not disk


def big_log_disk(n: int, size: int) -> CountingDisk:
    rng = random.Random(3)
    disk = CountingDisk()
    disk.append([Entry(1 + i // 300, i, EntryType.NORMAL, blob(rng, i, size)) for i in range(1, n + 1)])
    disk.set_hard_state(HardState(n // 300 + 1, None, n))
    disk.sync()
    return disk


def test_restart_with_a_large_log_loads_no_entry_data():
    n, size = 600, 20_000  # 12 MB of entries, all committed, none applied
    disk = big_log_disk(n, size)
    hs, snap, stored = disk.initial_state()
    cfg = Config(id="n1", voters=IDS3, max_committed_bytes=300_000)
    tracemalloc.start()
    try:
        core = Raft(cfg, random.Random(0), hs, snap, stored, applied=0, storage=disk, log_cache_bytes=100_000)
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 200_000  # the term runs, not the 12 MB of data
    assert disk.calls == 0 and core.log.resident_bytes() == 0
    assert core.log.last_index() == n and core.log.committed == n
    assert core.log.term(n) == disk.entries[-1].term
    # The unapplied committed entries come back from the disk a bounded batch at a time.
    applied: list[Entry] = []
    while core.has_ready():
        rd = core.ready()
        if rd.committed_entries:
            assert rd.committed_entries[0].index == len(applied) + 1
            assert len(rd.committed_entries) == 1 or sum(e.size() for e in rd.committed_entries) <= 300_000
            applied.extend(rd.committed_entries)
        core.advance(rd)
        assert core.log.resident_bytes() <= 100_000
    assert applied == disk.entries
    assert disk.bytes_read == n * (size + 4)


def test_a_failed_read_stops_the_core():
    """A store that cannot read an entry back (the server's LogCorruptError) fails the step
    that needed it, and every later ready()/has_ready(): the driving code must stop."""
    net = SyncNet(IDS3, log_cache_bytes=0)
    disk = CountingDisk()
    net.disks["n1"] = disk
    net.crash("n1")
    net.start("n1")
    net.elect("n1")
    net.isolate("n3")
    for i in range(5):
        net.propose("n1", b"w%d" % i)
    net.heal()
    broken = OSError("disk gone")
    disk.fail = broken
    leader = net["n1"]
    rejection = Message(
        MsgType.APPEND_RESP, "n1", "n3", leader.term, index=leader.log.last_index(),
        reject=True, reject_hint=2,
    )
    with pytest.raises(OSError, match="disk gone"):
        leader.step(rejection)
    assert leader.log.failed is broken
    with pytest.raises(OSError, match="disk gone"):
        leader.has_ready()
    with pytest.raises(OSError, match="disk gone"):
        leader.ready()
    assert leader.role == Role.LEADER  # nothing else was decided on the failed read
