"""Administrative requests on the client protocol: membership changes and online backups.

Dispatched from server/clients.py (ops in OPS); the reasons are in server/DESIGN.md,
"Membership" and "Backup and restore".

  {"op": "cluster_add",     "node_id": str, "address": "host:port"}   -> learner
  {"op": "cluster_promote", "node_id": str, "max_lag": int}           -> voter, once caught up
  {"op": "cluster_remove",  "node_id": str}                           (the leader: transfer first)
  {"op": "cluster_join",    "node_id": str, "address": "host:port"}   (node certificate only)
  {"op": "backup_begin", "linearizable": bool} -> {"token", "size", "sha256", "index", "node"}
  {"op": "backup_read", "token": str, "offset": int, "length": int} -> {"data": bytes}
  {"op": "backup_end", "token": str}

Every request may carry "timeout_ms" (capped by the node's request_timeout_s). Membership
changes run on the leader (others answer NOT_LEADER with a hint, like writes); refusals that
resending cannot fix are BAD_REQUEST, "not now" (another change pending, learner still
catching up) is UNAVAILABLE, which the driver retries until its deadline.

The membership file (DATA_DIR/membership.json) holds what a node must know about membership
beyond its log: the cluster's bootstrap voters (the base every CONF_CHANGE entry applies to)
and the address book of current members (the address of a node added at run time is otherwise
only in its CONF_CHANGE entry, which log compaction eventually discards).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from typing import Any

from raftsql.clientconn import DSN, ConnectionLost, NodeConnection, NodeUnreachable
from raftsql.protocol import ErrorKind, RequestError
from raftsql.raft.types import ConfChange, ConfChangeType, EntryType, Role

log = logging.getLogger("raftsql.admin")

MEMBERSHIP_FILE = "membership.json"
BACKUP_DIR = "backups"
BACKUP_CHUNK_MAX = 1 << 20  # bytes per backup_read response
PROMOTE_MAX_LAG = 100  # a learner is promoted once its match index is this close to the leader's
OPS = frozenset({
    "cluster_add", "cluster_promote", "cluster_remove", "cluster_join",
    "backup_begin", "backup_read", "backup_end",
})


# --------------------------------------------------------------------------- the membership file


def _parse_addr(text: str) -> tuple[str, int]:
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


def write_membership(data_dir: str, bootstrap_voters, addresses: dict[str, str]) -> None:
    os.makedirs(data_dir, exist_ok=True)
    doc = {"version": 1, "bootstrap_voters": sorted(bootstrap_voters), "addresses": dict(sorted(addresses.items()))}
    _write_json(os.path.join(data_dir, MEMBERSHIP_FILE), doc)


class Membership:
    """A node's membership file in memory. `addresses` is the address book of the current
    members as this node last applied them (advertised addresses, not --peer overrides)."""

    def __init__(self, data_dir: str, bootstrap_voters: tuple[str, ...], addresses: dict[str, str]):
        self.data_dir = data_dir
        self.bootstrap_voters = tuple(sorted(bootstrap_voters))
        self.addresses = dict(addresses)

    def save(self) -> None:
        write_membership(self.data_dir, self.bootstrap_voters, self.addresses)

    def apply(self, cc: ConfChange) -> bool:
        """Record one committed change; True if the book changed."""
        before = dict(self.addresses)
        if cc.type in (ConfChangeType.ADD_LEARNER, ConfChangeType.PROMOTE):
            addr = _context_address(cc)
            if addr is not None:
                self.addresses[cc.node_id] = addr
        elif cc.type == ConfChangeType.REMOVE:
            self.addresses.pop(cc.node_id, None)
        return before != self.addresses


def _context_address(cc: ConfChange) -> str | None:
    """The host:port in a change's context, or None. The context comes from the log (from the
    network, originally): anything that is not host:port is ignored, never interpreted."""
    if not cc.context:
        return None
    try:
        text = cc.context.decode("ascii")
        _parse_addr(text)
    except (UnicodeDecodeError, ValueError):
        log.warning("ignoring malformed address in the membership change for %s: %r", cc.node_id, cc.context[:80])
        return None
    return text


def init_membership(node, entries) -> None:
    """Called by Node.__init__ after the log store is loaded, before the core is built: fixes
    the bootstrap voters (persisted at the first start, or learned when joining) and fills the
    address book from the membership file and the CONF_CHANGE entries still in the log."""
    cfg = node.cfg
    doc = read_membership(cfg.data_dir)
    if doc is None:
        voters = tuple(cfg.bootstrap_voters) or tuple(sorted({cfg.id, *cfg.peers}))
        book = {pid: node.addresses[pid] for pid in cfg.peers}
        book[cfg.id] = node.addresses[cfg.id]
        m = Membership(cfg.data_dir, voters, book)
        m.save()
    else:
        m = Membership(cfg.data_dir, tuple(doc["bootstrap_voters"]), doc["addresses"])
        configured = tuple(sorted({cfg.id, *cfg.peers}))
        if cfg.peers and configured != m.bootstrap_voters:
            log.info("%s: bootstrap voters %s come from %s (the --peer list names %s)", cfg.id,
                     list(m.bootstrap_voters), MEMBERSHIP_FILE, list(configured))
    cfg.bootstrap_voters = m.bootstrap_voters
    # Changes already applied to SQLite but maybe not yet recorded (a crash in between).
    applied = node.sm.applied_index
    changed = False
    for nid, addr in node.sm.members().items():  # the replicated book (it survives compaction)
        if nid != cfg.id and nid not in m.addresses:
            m.addresses[nid] = addr
            changed = True
    for e in entries:
        if e.type == EntryType.CONF_CHANGE and e.index <= applied:
            changed |= m.apply(ConfChange.decode(e.data))
    if changed:
        m.save()
    node.membership = m
    for nid, addr in m.addresses.items():
        if nid != cfg.id and nid not in cfg.peers:
            node.addresses[nid] = addr


def member_change(cc: ConfChange):
    """What the state machine records for a committed change (its replicated address book)."""
    from raftsql.server.statemachine import MemberChange

    if cc.type == ConfChangeType.REMOVE:
        return MemberChange(cc.node_id, removed=True)
    return MemberChange(cc.node_id, address=_context_address(cc))


def adopt_members(node) -> None:
    """After a snapshot install: take the addresses of the current members from the replicated
    book in the new database (the changes it covers were never applied here one by one), and
    forget members that are gone. A --peer address still wins."""
    book = node.sm.members()
    with node._lock:
        members = (set(node.core.voters) | set(node.core.learners)) - {node.cfg.id}
    changed = False
    for nid in sorted(members):
        addr = book.get(nid)
        if addr is None:
            continue  # a first voter: known from --peer or the membership file
        if node.membership.addresses.get(nid) != addr:
            node.membership.addresses[nid] = addr
            changed = True
        if nid in node.cfg.peers:
            continue
        node.addresses[nid] = addr
        if node.transport is not None:
            node.transport.add_peer(nid, _parse_addr(addr))
    for nid in list(node.membership.addresses):
        if nid != node.cfg.id and nid not in members:
            del node.membership.addresses[nid]
            changed = True
            if node.transport is not None:
                node.transport.remove_peer(nid)
    if changed:
        node.membership.save()


def transport_peers(node) -> dict[str, tuple[str, int]]:
    """The peers the transport dials at start: every member of the core's configuration and of
    the address book (a joining node knows the current members only from its book). A --peer
    address wins over the book's (an operator's override, or a test's proxy)."""
    with node._lock:
        members = set(node.core.voters) | set(node.core.learners)
    members |= set(node.membership.addresses)
    members.discard(node.cfg.id)
    out = {}
    for nid in sorted(members):
        if nid in node.cfg.peers:
            out[nid] = node.cfg.peers[nid]
            continue
        addr = node.membership.addresses.get(nid) or node.addresses.get(nid)
        if addr is None:
            log.warning("%s: no address known for member %s", node.cfg.id, nid)
            continue
        out[nid] = _parse_addr(addr)
    return out


def apply_conf_change(node, cc: ConfChange) -> None:
    """A committed change, applied in log order from the Ready loop: update the address book
    (fsynced: it is the only record of a new member's address once the log is compacted) and
    the transport's peers."""
    if node.membership.apply(cc):
        node.membership.save()
    nid = cc.node_id
    if nid == node.cfg.id:
        if cc.type == ConfChangeType.REMOVE:
            log.warning("%s: this node was removed from the cluster; stop its process", nid)
        return
    if cc.type in (ConfChangeType.ADD_LEARNER, ConfChangeType.PROMOTE):
        if nid in node.cfg.peers:
            host, port = node.cfg.peers[nid]
            addr = f"{host}:{port}"
        else:
            addr = node.membership.addresses.get(nid)
        if addr is None:
            log.warning("%s: no address for new member %s", node.cfg.id, nid)
            return
        node.addresses[nid] = addr
        if node.transport is not None:
            node.transport.add_peer(nid, _parse_addr(addr))
    elif cc.type == ConfChangeType.REMOVE and node.transport is not None:
        node.transport.remove_peer(nid)


# --------------------------------------------------------------------------- joining


def join_cluster(cfg, dsn_text: str, timeout: float = 60.0) -> dict[str, Any]:
    """`raftsql node --join DSN`: ask the cluster (with this node's own certificate) to add it
    as a learner, then record the cluster's bootstrap voters and members in the membership
    file. A data directory that already has the file has joined before: nothing is sent."""
    from raftsql.server.tls import node_client_context

    doc = read_membership(cfg.data_dir)
    if doc is not None:
        log.info("%s: %s exists; already joined, not asking again", cfg.id, MEMBERSHIP_FILE)
        return doc
    address = cfg.advertise or f"{cfg.listen[0]}:{cfg.listen[1]}"
    host = _parse_addr(address)[0]
    if host in ("0.0.0.0", "::", ""):
        raise JoinError(f"--join needs an address the cluster can dial: set --advertise (listen is {address})")
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
        _parse_addr(addr)
    members[cfg.id] = address
    write_membership(cfg.data_dir, voters, members)
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
    while time.monotonic() < deadline:
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
            target = _parse_addr(err["leader_addr"])
            continue
        turn += 1
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    raise JoinError(f"the cluster did not add this node within {timeout:.0f} s: {last}")


class JoinError(Exception):
    """Raised when `raftsql node --join` cannot get the node added to the cluster."""


# --------------------------------------------------------------------------- the request handlers


class AdminService:
    """Handles OPS for ClientService. Backups in progress are kept per connection and their
    temporary files removed when it closes."""

    def __init__(self, node):
        self.node = node
        self._lock = threading.Lock()
        self._backups: dict[int, dict[str, str]] = {}  # id(conn) -> {token: path}
        self._backup_dir = os.path.join(node.cfg.data_dir, BACKUP_DIR)
        # Leftovers of a previous process (it died during a backup).
        shutil.rmtree(self._backup_dir, ignore_errors=True)

    # -- dispatch -----------------------------------------------------------------------

    def handle(self, op: str, req: dict[str, Any], conn) -> dict[str, Any]:
        deadline = self._deadline(req)
        if op == "cluster_add":
            nid, addr = self._node_id(req), self._address(req)
            return self._add(nid, addr, deadline)
        if op == "cluster_join":
            nid, addr = self._node_id(req), self._address(req)
            role, name = getattr(conn, "role", None), getattr(conn, "peer_name", None)
            if role != "node" or name != nid:
                raise RequestError(ErrorKind.BAD_REQUEST, f"only node {nid}'s own certificate may join it "
                                   f"(this connection uses a {role} certificate named {name!r})")
            return self._join(nid, addr, deadline)
        if op == "cluster_promote":
            max_lag = req.get("max_lag", PROMOTE_MAX_LAG)
            if not isinstance(max_lag, int) or isinstance(max_lag, bool) or max_lag < 0:
                raise RequestError(ErrorKind.BAD_REQUEST, "max_lag must be a non-negative integer")
            return self._promote(self._node_id(req), max_lag, deadline)
        if op == "cluster_remove":
            return self._remove(self._node_id(req), deadline)
        if op == "backup_begin":
            return self._backup_begin(conn, bool(req.get("linearizable", True)), deadline)
        if op == "backup_read":
            return self._backup_read(conn, req)
        if op == "backup_end":
            return self._backup_end(conn, req)
        raise RequestError(ErrorKind.BAD_REQUEST, f"unknown op {op!r}")

    def close_conn(self, conn) -> None:
        with self._lock:
            paths = self._backups.pop(id(conn), {})
        for p in paths.values():
            with contextlib.suppress(OSError):
                os.unlink(p)

    def _deadline(self, req: dict[str, Any]) -> float:
        limit = self.node.cfg.request_timeout_s
        t = req.get("timeout_ms")
        if isinstance(t, int) and not isinstance(t, bool) and t > 0:
            limit = min(limit, t / 1000.0)
        return time.monotonic() + limit

    @staticmethod
    def _node_id(req: dict[str, Any]) -> str:
        from raftsql.server.config import _ID

        nid = req.get("node_id")
        if not isinstance(nid, str) or not _ID.match(nid):
            raise RequestError(ErrorKind.BAD_REQUEST, f"node_id {nid!r} is not a valid node id")
        return nid

    @staticmethod
    def _address(req: dict[str, Any]) -> str:
        addr = req.get("address")
        try:
            if not isinstance(addr, str):
                raise ValueError(f"{addr!r} is not host:port")
            _parse_addr(addr)
        except ValueError as e:
            raise RequestError(ErrorKind.BAD_REQUEST, f"address: {e}") from None
        return addr

    # -- membership ---------------------------------------------------------------------

    def _leader_view(self) -> tuple[set[str], set[str]]:
        """(voters, learners) as the leader sees them; NOT_LEADER elsewhere."""
        node = self.node
        with node._lock:
            if node.core.role != Role.LEADER:
                raise node._not_leader()
            return set(node.core.voters), set(node.core.learners)

    def _members(self) -> dict[str, str | None]:
        node = self.node
        with node._lock:
            ids = set(node.core.voters) | set(node.core.learners)
        return {nid: node.membership.addresses.get(nid) or node.addresses.get(nid) for nid in sorted(ids)}

    def _add(self, nid: str, addr: str, deadline: float) -> dict[str, Any]:
        voters, learners = self._leader_view()
        if nid in voters:
            raise RequestError(ErrorKind.BAD_REQUEST, f"{nid} is already a voter")
        if nid in learners:
            known = self.node.membership.addresses.get(nid)
            if known == addr:
                return {"node_id": nid, "role": "learner", "index": None, "already": True, "members": self._members()}
            raise RequestError(ErrorKind.BAD_REQUEST, f"{nid} is already a learner at {known}; remove it first to change its address")
        index = self.node.propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, nid, addr.encode()), deadline)
        return {"node_id": nid, "role": "learner", "index": index, "members": self._members()}

    def _join(self, nid: str, addr: str, deadline: float) -> dict[str, Any]:
        voters, learners = self._leader_view()
        if nid in voters:
            # A voter that lost its data must not come back as the same voter: it would vote
            # without the entries it once acknowledged.
            raise RequestError(ErrorKind.BAD_REQUEST, f"{nid} is already a voter: remove it first (`raftsql cluster remove`), then join it with an empty data directory")
        out = self._add(nid, addr, deadline)
        out["bootstrap_voters"] = list(self.node.cfg.voters())
        return out

    def _promote(self, nid: str, max_lag: int, deadline: float) -> dict[str, Any]:
        node = self.node
        while True:
            voters, learners = self._leader_view()
            if nid in voters:
                return {"node_id": nid, "role": "voter", "index": None, "already": True, "members": self._members()}
            if nid not in learners:
                raise RequestError(ErrorKind.BAD_REQUEST, f"{nid} is not a learner; add it first (`raftsql cluster add` or `raftsql node --join`)")
            with node._lock:
                pr = node.core.progress.get(nid)
                last = node.core.log.last_index()
                match = pr.match if pr is not None else 0
                replicating = pr is not None and pr.state == 1  # REPLICATE: streaming appends
            if replicating and match >= last - max_lag:
                break
            if time.monotonic() >= deadline:
                raise RequestError(ErrorKind.UNAVAILABLE, f"{nid} has not caught up yet (match index {match}, "
                                   f"leader's last index {last}); try again")
            time.sleep(0.05)
        index = node.propose_conf_change(ConfChange(ConfChangeType.PROMOTE, nid), deadline)
        return {"node_id": nid, "role": "voter", "index": index, "members": self._members()}

    def _remove(self, nid: str, deadline: float) -> dict[str, Any]:
        node = self.node
        voters, learners = self._leader_view()
        if nid not in voters | learners:
            raise RequestError(ErrorKind.BAD_REQUEST, f"{nid} is not a member (members: {', '.join(sorted(voters | learners))})")
        if voters == {nid}:
            raise RequestError(ErrorKind.BAD_REQUEST, f"{nid} is the last voter: a cluster cannot remove its last voter")
        if nid == node.cfg.id:
            self._hand_over(deadline)  # raises NOT_LEADER naming the new leader, who removes us
        index = node.propose_conf_change(ConfChange(ConfChangeType.REMOVE, nid), deadline)
        return {"node_id": nid, "role": None, "index": index, "members": self._members()}

    def _hand_over(self, deadline: float) -> None:
        """Removing the leader: transfer leadership to the most up-to-date voter first, then
        answer NOT_LEADER so the driver resends the removal to the new leader."""
        node = self.node
        with node._lock:
            cands = [(p.match, v) for v, p in node.core.progress.items() if v != node.cfg.id and v in node.core.voters]
            if not cands:
                raise RequestError(ErrorKind.BAD_REQUEST, "no other voter to hand leadership to")
            target = max(cands)[1]
            try:
                node.core.transfer_leadership(target)
            except ValueError as e:
                raise RequestError(ErrorKind.UNAVAILABLE, f"cannot transfer leadership: {e}") from None
            node._wake.notify_all()
        limit = min(deadline, time.monotonic() + 2 * node.cfg.election_ticks * node.cfg.tick_ms / 1000.0)
        while time.monotonic() < limit:
            with node._lock:
                if node.core.role != Role.LEADER:
                    leader = node.core.leader
                    break
            time.sleep(0.01)
        else:
            with node._lock:
                if node.core.role == Role.LEADER:
                    node.core.transfer_leadership(node.cfg.id)  # cancel: accept writes again
            raise RequestError(ErrorKind.UNAVAILABLE, f"could not hand leadership to {target} in time; try again")
        log.info("%s handed leadership to %s before its removal", node.cfg.id, target)
        raise RequestError(ErrorKind.NOT_LEADER, f"{node.cfg.id} handed leadership over before its removal",
                           leader, node.addresses.get(leader) if leader else None)

    # -- backups ------------------------------------------------------------------------

    def _backup_begin(self, conn, linearizable: bool, deadline: float) -> dict[str, Any]:
        node = self.node
        if linearizable:
            # Every write acknowledged before the backup began is in it.
            node._wait_read_index(deadline)
        os.makedirs(self._backup_dir, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="backup-", suffix=".db", dir=self._backup_dir)
        os.close(fd)
        token = secrets.token_hex(16)
        with self._lock:
            self._backups.setdefault(id(conn), {})[token] = path
        try:
            index = copy_database(node.sm.path, path)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            size = os.path.getsize(path)
        except BaseException:
            self._drop(conn, token)
            raise
        log.info("%s: backup at index %d, %d bytes", node.cfg.id, index, size)
        return {"token": token, "size": size, "sha256": h.hexdigest(), "index": index, "node": node.cfg.id,
                "chunk_max": BACKUP_CHUNK_MAX}

    def _backup_path(self, conn, req: dict[str, Any]) -> tuple[str, str]:
        token = req.get("token")
        with self._lock:
            path = self._backups.get(id(conn), {}).get(token) if isinstance(token, str) else None
        if path is None:
            raise RequestError(ErrorKind.BAD_REQUEST, "unknown backup token (backups belong to the connection that began them)")
        return token, path

    def _backup_read(self, conn, req: dict[str, Any]) -> dict[str, Any]:
        _, path = self._backup_path(conn, req)
        offset, length = req.get("offset"), req.get("length", BACKUP_CHUNK_MAX)
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and 0 < length):
            raise RequestError(ErrorKind.BAD_REQUEST, "offset and length must be non-negative integers")
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(min(length, BACKUP_CHUNK_MAX))
        return {"offset": offset, "data": data}

    def _backup_end(self, conn, req: dict[str, Any]) -> dict[str, Any]:
        token, _ = self._backup_path(conn, req)
        self._drop(conn, token)
        return {"ended": True}

    def _drop(self, conn, token: str) -> None:
        with self._lock:
            path = self._backups.get(id(conn), {}).pop(token, None)
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)


def copy_database(src_path: str, dst_path: str) -> int:
    """A consistent copy of the SQLite database at src_path, for a user: SQLite's online backup
    from a read-only connection, in one step (one read transaction, so no write that commits
    meanwhile can tear it). raftsql's per-client sessions and transaction bookkeeping are
    emptied and the file vacuumed (they are no user's data); `sqlite_raftsql_meta` is kept, so the
    file records the log index it holds. Returns that index."""
    import apsw

    src = apsw.Connection(src_path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        dst = apsw.Connection(dst_path)
        try:
            with dst.backup("main", src, "main") as b:
                while not b.done:
                    b.step(-1)
        finally:
            dst.close()
    finally:
        src.close()
    dst = apsw.Connection(dst_path)
    try:
        index = dst.execute("SELECT applied_index FROM sqlite_raftsql_meta").fetchall()[0][0]
        dst.execute("PRAGMA journal_mode=DELETE").fetchall()
        # SQLite never lets a sqlite_* table be dropped: empty them (they stay hidden).
        internal = [r[0] for r in dst.execute(
            "SELECT name FROM sqlite_schema WHERE type='table' AND name LIKE 'sqlite\\_raftsql\\_%' "
            "ESCAPE '\\' AND name != 'sqlite_raftsql_meta'")]
        for name in internal:
            dst.execute(f'DELETE FROM "{name}"')
        dst.execute("VACUUM")
    finally:
        dst.close()
    return int(index)
