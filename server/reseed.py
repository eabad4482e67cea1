"""Re-seeding a node whose own database is damaged (`raftsql node ... --reseed`).

A node stops when its SQLite file fails SQLite's own check (DatabaseDamagedError: the log says
so and names this command). Re-seeding brings it back without hand surgery: its database,
snapshots and Raft log are moved aside into DATA_DIR/damaged-<UTC time>/ (kept for a post-mortem),
its term and vote are kept, and it starts empty. The leader then brings it up to date like any
lagging follower: with InstallSnapshot if the leader compacted its log, else by sending every
entry again.

Why the log goes too: entries before the node's last snapshot exist only in that snapshot, which
may be as damaged as the database, and replaying half a log onto nothing cannot work. Why that is
safe: the node may have acknowledged entries that it no longer holds, so until its log reaches
its old last index again it neither votes nor campaigns (the core's `vote_barrier`, persisted
here in reseed.json until it is lifted). A committed entry it acknowledged is meanwhile still on
another member of every majority that could elect a leader, and the node gets it back from that
leader before it votes again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

from raftsql.raft.types import HardState
from raftsql.server.logformat import _fsync_dir
from raftsql.server.logstore import LogStore

log = logging.getLogger("raftsql.reseed")

RESEED_FILE = "reseed.json"
_MOVED = ("db.sqlite", "db.sqlite-wal", "db.sqlite-shm", "snapshots", "raft-log")


def vote_barrier(data_dir: str) -> int:
    """The vote barrier left by an unfinished re-seed (0: none)."""
    try:
        with open(os.path.join(data_dir, RESEED_FILE)) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as e:
        raise ReseedError(f"{os.path.join(data_dir, RESEED_FILE)} is unreadable: {e}") from None
    barrier = doc.get("vote_barrier") if isinstance(doc, dict) else None
    if type(barrier) is not int or barrier < 0:
        raise ReseedError(f"{os.path.join(data_dir, RESEED_FILE)} holds no valid vote_barrier")
    return barrier


class ReseedError(Exception):
    """Raised when a data directory cannot be re-seeded (or its re-seed record is damaged)."""


def reseed(data_dir: str) -> dict:
    """Move the node's database, snapshots and log aside and leave it empty but for its term
    and vote, with a vote barrier at its old last log index. Returns what was done."""
    data_dir = os.path.abspath(data_dir)
    log_dir = os.path.join(data_dir, "raft-log")
    if not os.path.isdir(log_dir):
        raise ReseedError(f"{data_dir} holds no Raft log: nothing to re-seed (start it normally)")
    store = LogStore(log_dir)
    try:
        hs, snap, stored = store.initial_state()
    finally:
        store.close()
    barrier = max(stored.last_index, snap.index, hs.commit, vote_barrier(data_dir))
    dest = os.path.join(data_dir, time.strftime("damaged-%Y%m%dT%H%M%SZ", time.gmtime()))
    while os.path.exists(dest):
        dest += "-1"
    os.makedirs(dest, mode=0o700)
    moved = []
    for name in _MOVED:
        src = os.path.join(data_dir, name)
        if os.path.lexists(src):
            shutil.move(src, os.path.join(dest, name))
            moved.append(name)
    _fsync_dir(dest)
    _fsync_dir(data_dir)
    # Only the hard state survives: a vote given in this term must never be given again.
    store = LogStore(log_dir)
    try:
        store.initial_state()
        store.set_hard_state(HardState(hs.term, hs.vote, 0))
        store.sync()
    finally:
        store.close()
    doc = {"vote_barrier": barrier, "term": hs.term, "moved_to": dest,
           "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = os.path.join(data_dir, RESEED_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(data_dir, RESEED_FILE))
    _fsync_dir(data_dir)
    log.warning(
        "re-seeded %s: moved %s to %s; kept term %d and vote %s; this node will not vote until "
        "its log reaches index %d again (from the leader)",
        data_dir, ", ".join(moved) or "nothing", dest, hs.term, hs.vote, barrier,
    )
    return {"moved": moved, "moved_to": dest, **doc}


def lift(data_dir: str) -> None:
    """The node's durable log reached the barrier: remove the record (durably)."""
    path = os.path.join(data_dir, RESEED_FILE)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    _fsync_dir(data_dir)
