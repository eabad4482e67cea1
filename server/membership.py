"""A node's view of the cluster's membership beyond its Raft log (server/DESIGN.md, "Membership").

The Raft core knows who the voters and learners are; this component knows where they are. It
keeps:
- the bootstrap voters, the base every CONF_CHANGE entry applies to (fixed at the first start,
  or learned when joining);
- the address book of current members, as advertised in their membership changes, persisted in
  DATA_DIR/membership.json (a member added at run time is otherwise only named in its
  CONF_CHANGE entry, which log compaction eventually discards), and replicated in the state
  machine (sqlite_raftsql_members) so snapshots carry it;
- the addresses this node dials (`addresses`: the book, except where --peer overrides it).
It also runs `raftsql node --join` (join_cluster), before the node starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import time
from typing import Any

import msgpack

from raftsql.clientconn import DSN, ConnectionLost, NodeConnection, NodeUnreachable
from raftsql.protocol import ErrorKind
from raftsql.raft.types import ConfChange, ConfChangeType, Entry, EntryType
from raftsql.server.config import NodeConfig
from raftsql.server.records import MemberChange
from raftsql.server.tls import node_client_context, own_cert_covers

log = logging.getLogger("raftsql.membership")

MEMBERSHIP_FILE = "membership.json"


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)


def _write_json(path: str, doc: dict[str, Any]) -> None:
    """Atomically: a temp file, fsync, rename, fsync of the directory."""
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".membership-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_membership(data_dir: str) -> dict[str, Any] | None:
    path = os.path.join(data_dir, MEMBERSHIP_FILE)
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    voters, addrs = doc.get("bootstrap_voters"), doc.get("addresses")
    if (doc.get("version") != 1 or not isinstance(voters, list) or not voters
            or not all(isinstance(v, str) for v in voters) or not isinstance(addrs, dict)):
        raise ValueError(f"{path} is malformed")
    return doc


def write_membership(data_dir: str, bootstrap_voters, addresses: dict[str, str],
                     node_id: str | None = None) -> None:
    os.makedirs(data_dir, exist_ok=True)
    doc = {"version": 1, "bootstrap_voters": sorted(bootstrap_voters), "addresses": dict(sorted(addresses.items()))}
    if node_id is not None:
        doc["node_id"] = node_id  # whose state this directory holds (checked at every start)
    _write_json(os.path.join(data_dir, MEMBERSHIP_FILE), doc)


class MembershipMismatch(Exception):
    """The data directory's membership and the --peer list cannot both be right (see
    Membership.open): the node refuses to start."""


def check_node_id(cfg: NodeConfig) -> dict[str, Any] | None:
    """The data directory's membership file, after checking that it belongs to cfg.id; raises
    MembershipMismatch otherwise (before the node touches anything in the directory)."""
    doc = read_membership(cfg.data_dir)
    if doc is not None and doc.get("node_id") not in (None, cfg.id):
        raise MembershipMismatch(
            f"{cfg.data_dir} holds the state of node {doc['node_id']}, not of {cfg.id} (its "
            f"term, vote and log): started as {cfg.id} it could vote twice in one term. "
            f"Start it as --id {doc['node_id']}, or give {cfg.id} its own data directory")
    return doc


class Membership:
    """Bootstrap voters, the address book and the dial addresses of one node. Used by the
    node's Ready path (changes are applied in log order) and read by request threads."""

    def __init__(self, cfg: NodeConfig, bootstrap_voters: tuple[str, ...], book: dict[str, str]):
        self._cfg = cfg
        self.bootstrap_voters = tuple(sorted(bootstrap_voters))
        self.book = dict(book)  # advertised addresses of the members (persisted)
        # Where to dial each node: --peer overrides (an operator's, or a test proxy), else the
        # book; our own advertised address too (leader hints name it).
        self.addresses: dict[str, str] = {pid: f"{h}:{p}" for pid, (h, p) in cfg.peers.items()}
        self.addresses[cfg.id] = cfg.advertise or f"{cfg.listen[0]}:{cfg.listen[1]}"
        for nid, addr in self.book.items():
            if nid != cfg.id and nid not in cfg.peers:
                self.addresses[nid] = addr

    @classmethod
    def open(cls, cfg: NodeConfig, replicated: dict[str, str], conf_changes: list[Entry],
             applied: int, pristine: bool = False) -> Membership:
        """At start, before the core is built: the membership file (written at the first
        start), completed from the state machine's replicated book and the CONF_CHANGE entries
        already applied (a crash may have come between applying and recording them).

        pristine: this node has no term, vote, entry or snapshot yet (a first start that
        failed before the node ran, say on a port in use). Its membership file then promises
        nothing to anyone and the --peer list, if it differs, replaces it. A data directory
        that ran as a one-node cluster, started with --peer naming other nodes that are not
        its members, is refused (MembershipMismatch): it would elect itself alone beside the
        cluster the operator meant, and both would take writes."""
        doc = check_node_id(cfg)
        own = cfg.advertise or f"{cfg.listen[0]}:{cfg.listen[1]}"
        configured = tuple(sorted({cfg.id, *cfg.peers}))
        if (doc is not None and pristine and cfg.peers
                and tuple(sorted(doc["bootstrap_voters"])) != configured):
            log.info("%s: %s was written by a start that never ran; bootstrapping from the "
                     "--peer list %s instead of %s", cfg.id, MEMBERSHIP_FILE, list(configured),
                     list(doc["bootstrap_voters"]))
            doc = None
        if doc is None:
            voters = tuple(cfg.bootstrap_voters) or tuple(sorted({cfg.id, *cfg.peers}))
            book = {pid: f"{h}:{p}" for pid, (h, p) in cfg.peers.items()}
            book[cfg.id] = own
            m = cls(cfg, voters, book)
            m.save()
        else:
            m = cls(cfg, tuple(doc["bootstrap_voters"]), doc["addresses"])
            if cfg.peers and configured != m.bootstrap_voters:
                members = {*m.bootstrap_voters, *replicated}
                for e in conf_changes:
                    if e.type == EntryType.CONF_CHANGE:
                        members.add(ConfChange.decode(e.data).node_id)
                strangers = sorted(set(cfg.peers) - members)
                if m.bootstrap_voters == (cfg.id,) and strangers:
                    raise MembershipMismatch(
                        f"{cfg.data_dir} holds a one-node cluster of {cfg.id}, but --peer names "
                        f"{', '.join(strangers)}, which never joined it: started so, {cfg.id} "
                        "would elect itself alone and take writes beside the cluster you mean. "
                        f"To join that cluster, move {cfg.data_dir} away and start again (its data "
                        f"stays in the move); to keep the one-node cluster, start {cfg.id} without "
                        "--peer and grow it with `raftsql cluster add`")
                log.info("%s: bootstrap voters %s come from %s (the --peer list names %s)", cfg.id,
                         list(m.bootstrap_voters), MEMBERSHIP_FILE, list(configured))
        cfg.bootstrap_voters = m.bootstrap_voters
        changed = False
        for nid, addr in replicated.items():  # the replicated book (it survives compaction)
            if nid != cfg.id and nid not in m.book:
                m.book[nid] = addr
                changed = True
        for e in conf_changes:
            if e.type == EntryType.CONF_CHANGE and e.index <= applied:
                changed |= m.record(ConfChange.decode(e.data))
        if changed:
            m.save()
        for nid, addr in m.book.items():
            if nid != cfg.id and nid not in cfg.peers:
                m.addresses[nid] = addr
        return m

    def save(self) -> None:
        write_membership(self._cfg.data_dir, self.bootstrap_voters, self.book, self._cfg.id)

    def address_of(self, nid: str | None) -> str | None:
        return self.addresses.get(nid) if nid else None

    def record(self, cc: ConfChange) -> bool:
        """Record one committed change in the book; True if it changed."""
        before = dict(self.book)
        if cc.type in (ConfChangeType.ADD_LEARNER, ConfChangeType.PROMOTE):
            addr = _context_address(cc)
            if addr is not None:
                self.book[cc.node_id] = addr
        elif cc.type == ConfChangeType.REMOVE:
            self.book.pop(cc.node_id, None)
        return before != self.book

    def apply(self, cc: ConfChange) -> tuple[str, str, tuple[str, int] | None] | None:
        """A committed change, in log order: update the book (fsynced: once the log is
        compacted it is the only record of a new member's address). Returns what the transport
        must do: ("add", node_id, (host, port)), ("remove", node_id, None), or None."""
        if self.record(cc):
            self.save()
        nid = cc.node_id
        if nid == self._cfg.id:
            return None  # Node._apply_conf_change says so if this node is no longer a member
        if cc.type in (ConfChangeType.ADD_LEARNER, ConfChangeType.PROMOTE):
            if nid in self._cfg.peers:
                host, port = self._cfg.peers[nid]
                addr = f"{host}:{port}"
            else:
                addr = self.book.get(nid)
            if addr is None:
                log.warning("%s: no address for new member %s", self._cfg.id, nid)
                return None
            self.addresses[nid] = addr
            return ("add", nid, parse_addr(addr))
        if cc.type == ConfChangeType.REMOVE:
            return ("remove", nid, None)
        return None

    def adopt(self, replicated: dict[str, str], members: set[str]) -> list[tuple[str, str, Any]]:
        """After a snapshot install: take the current members' addresses from the replicated
        book of the new database (the changes it covers were never applied here one by one),
        and forget members that are gone. A --peer address still wins. Returns the transport
        changes, as apply() does."""
        members = members - {self._cfg.id}
        out: list[tuple[str, str, Any]] = []
        changed = False
        for nid in sorted(members):
            addr = replicated.get(nid)
            if addr is None:
                continue  # a first voter: known from --peer or the membership file
            if self.book.get(nid) != addr:
                self.book[nid] = addr
                changed = True
            if nid in self._cfg.peers:
                continue
            self.addresses[nid] = addr
            out.append(("add", nid, parse_addr(addr)))
        for nid in list(self.book):
            if nid != self._cfg.id and nid not in members:
                del self.book[nid]
                changed = True
                out.append(("remove", nid, None))
        if changed:
            self.save()
        return out

    def dial_list(self, members: set[str]) -> dict[str, tuple[str, int]]:
        """The peers the transport dials at start: every member of the core's configuration
        and of the book (a joining node knows the current members only from its book). A
        --peer address wins over the book's."""
        members = (set(members) | set(self.book)) - {self._cfg.id}
        out = {}
        for nid in sorted(members):
            if nid in self._cfg.peers:
                out[nid] = self._cfg.peers[nid]
                continue
            addr = self.book.get(nid) or self.addresses.get(nid)
            if addr is None:
                log.warning("%s: no address known for member %s", self._cfg.id, nid)
                continue
            out[nid] = parse_addr(addr)
        return out

    def learned(self, nid: str, address: str) -> tuple[str, int]:
        """A node dialed us and named its address (its hello) while we had none to dial it:
        use it (our known addresses and --peer overrides stay). Returns where to dial it."""
        self.addresses.setdefault(nid, address)
        return parse_addr(address)

    def members(self, ids: set[str]) -> dict[str, str | None]:
        return {nid: self.book.get(nid) or self.addresses.get(nid) for nid in sorted(ids)}


def member_change(cc: ConfChange) -> MemberChange:
    """What the state machine records for a committed change (its replicated address book,
    and the audit trail)."""
    address, audit = _context(cc)
    if cc.type == ConfChangeType.REMOVE:
        return MemberChange(cc.node_id, removed=True, audit=audit)
    return MemberChange(cc.node_id, address=address, audit=audit)


# A change's context: the member's "host:port" in ASCII (as it has always been), or, for a
# change an administrator asked for, a msgpack map {"address"?, "op", "by", "by_serial"}: who
# asked, for the audit trail (server/records.py). A map starts with a byte no address can.
_AUDIT_KEYS = ("op", "by", "by_serial")


def change_context(address: str | None, audit: dict[str, Any] | None) -> bytes:
    """The context to propose with a change (see above)."""
    if audit is None:
        return address.encode("ascii") if address else b""
    doc = {k: audit[k] for k in _AUDIT_KEYS if isinstance(audit.get(k), str)}
    if address:
        doc["address"] = address
    return msgpack.packb(doc, use_bin_type=True)


def _context(cc: ConfChange) -> tuple[str | None, dict[str, Any] | None]:
    """(host:port or None, audit map or None) of a change's context. The context comes from
    the log (from the network, originally): anything malformed is ignored, never interpreted."""
    ctx = cc.context
    if not ctx:
        return None, None
    audit: dict[str, Any] | None = None
    text: Any = None
    malformed = False
    if 0x80 <= ctx[0] <= 0x8F or ctx[0] in (0xDE, 0xDF):  # a msgpack map
        try:
            doc = msgpack.unpackb(ctx, raw=False, strict_map_key=True)
        except Exception:  # noqa: BLE001 - malformed: ignored, like a bad address
            doc = None
        if isinstance(doc, dict):
            audit = {k: doc[k] for k in _AUDIT_KEYS if isinstance(doc.get(k), str)} or None
            text = doc.get("address")
        else:
            malformed = True
    else:
        try:
            text = ctx.decode("ascii")
        except UnicodeDecodeError:
            malformed = True
    if text is not None and not _is_addr(text):
        malformed, text = True, None
    if malformed:
        log.warning("ignoring malformed address in the membership change for %s: %r",
                    cc.node_id, ctx[:80])
    return text, audit


def _is_addr(text: Any) -> bool:
    try:
        parse_addr(text)
    except (TypeError, ValueError, AttributeError):
        return False
    return True


def _context_address(cc: ConfChange) -> str | None:
    """The host:port in a change's context, or None."""
    return _context(cc)[0]



# --------------------------------------------------------------------------- joining


def _ran(data_dir: str) -> bool:
    """Has the node of data_dir ever run (a term, a vote, an entry or a snapshot)?"""
    from raftsql.server.logstore import LogStore

    path = os.path.join(data_dir, "raft-log")
    if not os.path.isdir(path):
        return False
    store = LogStore(path)
    try:
        hs, snap, stored = store.initial_state()
    finally:
        store.close()
    return bool(hs.term or hs.vote is not None or snap.index or stored.last_index)


def join_cluster(cfg, dsn_text: str, timeout: float = 60.0) -> dict[str, Any]:
    """`raftsql node --join DSN`: ask the cluster (with this node's own certificate) to add it
    as a learner, then record the cluster's bootstrap voters and members in the membership
    file. A data directory that already has the file has joined before: nothing is sent."""
    doc = read_membership(cfg.data_dir)
    if doc is not None and list(doc.get("bootstrap_voters") or ()) == [cfg.id]:
        # Written by a start without --join: a node that joined records the cluster's voters,
        # never itself alone.
        if _ran(cfg.data_dir):
            raise JoinError(
                f"{cfg.data_dir} holds a one-node cluster of {cfg.id} that has run: --join would "
                f"be ignored and {cfg.id} would go on alone, taking writes beside the cluster you "
                f"mean. To join, move {cfg.data_dir} away and start again (its data stays in the "
                "move); to keep the one-node cluster, start it without --join")
        log.info("%s: %s was written by a start that never ran; joining instead", cfg.id,
                 MEMBERSHIP_FILE)
        doc = None
    if doc is not None:
        log.info("%s: %s exists; already joined, not asking again", cfg.id, MEMBERSHIP_FILE)
        return doc
    address = cfg.advertise or f"{cfg.listen[0]}:{cfg.listen[1]}"
    host = parse_addr(address)[0]
    if host in ("0.0.0.0", "::", ""):
        raise JoinError(f"--join needs an address the cluster can dial: set --advertise (listen is {address})")
    # What would leave a member behind that nobody can reach, checked before asking to join.
    if not own_cert_covers(cfg.certs_dir, cfg.id, host):
        raise JoinError(
            f"this node's certificate does not hold {host}, the address its peers would dial "
            f"({address}): they would refuse it. Make its certificate with `raftsql certs node "
            f"{cfg.id} --host {host}`, or listen/advertise on a host it holds; nothing was asked")
    try:
        family = socket.AF_INET6 if ":" in cfg.listen[0] else socket.AF_INET
        with socket.create_server((cfg.listen[0].strip("[]"), cfg.listen[1]), family=family):
            pass
    except OSError as e:
        raise JoinError(f"cannot listen on {cfg.listen[0]}:{cfg.listen[1]}: {e.strerror or e}; "
                        "nothing was asked") from None
    try:
        hosts = DSN.parse(dsn_text).hosts
    except ValueError as e:
        raise JoinError(f"--join: {e}") from None
    result = _ask_cluster(hosts, node_client_context(cfg.certs_dir, cfg.id), timeout, {
        "op": "cluster_join", "node_id": cfg.id, "address": address,
        "timeout_ms": int(min(timeout, 30.0) * 1000)})
    voters = result.get("bootstrap_voters")
    members = result.get("members")
    if not (isinstance(voters, list) and voters and isinstance(members, dict)):
        raise JoinError(f"malformed join reply: {result!r}")
    members = {str(k): str(v) for k, v in members.items()}
    for addr in members.values():
        parse_addr(addr)
    members[cfg.id] = address
    write_membership(cfg.data_dir, voters, members, cfg.id)
    log.info("%s joined as a learner at index %s; bootstrap voters %s, members %s", cfg.id,
             result.get("index"), voters, sorted(members))
    return read_membership(cfg.data_dir)


def _ask_cluster(hosts: list[tuple[str, int]], ctx: Any, timeout: float,
                 request: dict[str, Any]) -> dict[str, Any]:
    """Send one request to the cluster's leader: try the hosts in turn, follow NOT_LEADER
    hints, wait out elections, until `timeout`. A join is idempotent (the leader answers an
    existing learner with its membership), so resending after a lost answer is safe."""
    deadline = time.monotonic() + timeout
    target: tuple[str, int] | None = None
    last = "no answer"
    turn = 0
    told = False
    while time.monotonic() < deadline:
        if turn >= len(hosts) and not told:
            # A whole round failed: say so once, rather than nothing until the deadline.
            told = True
            log.warning("no node of the cluster has answered yet (%s); trying again for up to "
                        "%.0f s", last, max(0.0, deadline - time.monotonic()))
        addr = target or hosts[turn % len(hosts)]
        target = None
        remaining = deadline - time.monotonic()
        try:
            conn = NodeConnection(addr[0], addr[1], ctx, min(5.0, remaining))
        except NodeUnreachable as e:
            last, turn = str(e), turn + 1
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            continue
        try:
            resp = conn.request(request, remaining + 0.5)
        except ConnectionLost as e:
            last, turn = str(e), turn + 1
            continue
        finally:
            conn.close()
        if resp.get("ok"):
            return resp["result"]
        err = resp.get("error") or {}
        last = f"{err.get('kind')}: {err.get('message')}"
        if err.get("kind") == ErrorKind.BAD_REQUEST:
            raise JoinError(f"the cluster did not add this node: {err.get('message')}")
        if err.get("kind") == ErrorKind.NOT_LEADER and err.get("leader_addr"):
            target = parse_addr(err["leader_addr"])
            continue
        turn += 1
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    raise JoinError(f"the cluster did not add this node within {timeout:.0f} s: {last}")


class JoinError(Exception):
    """Raised when `raftsql node --join` cannot get the node added to the cluster."""
