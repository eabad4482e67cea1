"""Administrative calls used by the CLI, on top of the low-level connection: status,
membership changes (cluster add / promote / remove), backup, restore and revocation. The server
side is server/admin.py; all but status need an admin client certificate (server/access.py).
stdlib + msgpack only, as the rest of the driver."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable
from typing import Any

from raftsql.driver._conn import DSN, ConnectionLost, NodeConnection, NodeUnreachable
from raftsql.driver._tls import client_context, default_paths
from raftsql.protocol import ErrorKind


def context_for(dsn: DSN):
    certs = dsn.params.get("certs")
    if not certs:
        raise ValueError("the DSN needs ?certs=DIR (the directory made by `raftsql certs init`)")
    return client_context(*default_paths(certs))


def cluster_status(dsn_text: str, timeout: float = 3.0) -> list[dict[str, Any]]:
    dsn, ctx = _parse(dsn_text)
    rows = []
    for host, port in dsn.hosts:
        addr = f"{host}:{port}"
        try:
            conn = NodeConnection(host, port, ctx, timeout)
        except NodeUnreachable as e:
            rows.append({"address": addr, "error": str(e)})
            continue
        try:
            resp = conn.request({"op": "status"}, timeout)
            rows.append(resp["result"] if resp.get("ok") else {"address": addr, "error": resp.get("error")})
        except OSError as e:
            rows.append({"address": addr, "error": str(e)})
        finally:
            conn.close()
    return rows


# --------------------------------------------------------------------------- membership


class AdminError(Exception):
    """Raised when an administrative command (backup, restore) fails; the message says why."""


def _parse(dsn_text: str):
    """(DSN, SSLContext); a bad DSN is an AdminError (a one-line message in the CLI)."""
    try:
        dsn = DSN.parse(dsn_text)
        return dsn, context_for(dsn)
    except ValueError as e:
        raise AdminError(str(e)) from None


def _admin_client(dsn_text: str, timeout: float):
    from raftsql.driver._client import Client

    dsn, ctx = _parse(dsn_text)
    return Client(dsn.hosts, ctx, timeout=timeout)


def _admin_call(dsn_text: str, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one membership request to the leader (following redirects; UNAVAILABLE, e.g.
    another change in progress, is retried until `timeout`). Raises the driver's BadRequest
    for refusals and Unavailable when the deadline passed."""
    client = _admin_client(dsn_text, timeout)
    try:
        # A node waits at most half the budget per attempt, so the driver can retry elsewhere.
        req = dict(req, timeout_ms=max(1000, int(timeout * 500)))
        return client._call(req, timeout, None)
    finally:
        client.close()


def cluster_add(dsn_text: str, node_id: str, address: str, timeout: float = 30.0) -> dict[str, Any]:
    """Add node_id (reachable at address) as a learner: it receives the log but does not vote."""
    return _admin_call(dsn_text, {"op": "cluster_add", "node_id": node_id, "address": address}, timeout)


def cluster_promote(dsn_text: str, node_id: str, timeout: float = 60.0, max_lag: int | None = None) -> dict[str, Any]:
    """Make learner node_id a voter once its log is within max_lag entries of the leader's."""
    req: dict[str, Any] = {"op": "cluster_promote", "node_id": node_id}
    if max_lag is not None:
        req["max_lag"] = max_lag
    return _admin_call(dsn_text, req, timeout)


def cluster_remove(dsn_text: str, node_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """Remove node_id (voter or learner). The leader hands leadership over first."""
    return _admin_call(dsn_text, {"op": "cluster_remove", "node_id": node_id}, timeout)


# --------------------------------------------------------------------------- revocation


def revocation_target(text: str) -> str:
    """NAME-or-SERIAL as the node takes it: "name:NAME" or "serial:HEX" (lower-case, no leading
    zeros). A value of hex digits (colons allowed) with at least 16 of them is a serial (what
    `raftsql certs show` prints; certificate serials have about 40); anything else is a name.
    An explicit "name:" or "serial:" prefix decides."""
    text = text.strip()
    kind, sep, value = text.partition(":")
    if sep and kind in ("name", "serial"):
        explicit, text = kind, value.strip()
    else:
        explicit = None
    digits = text.replace(":", "")
    is_hex = bool(digits) and all(c in "0123456789abcdefABCDEF" for c in digits)
    if explicit == "serial" or (explicit is None and is_hex and len(digits) >= 16):
        if not is_hex:
            raise AdminError(f"{text!r} is not a hexadecimal serial number")
        value = int(digits, 16)
        if value <= 0:
            raise AdminError("a certificate serial number is positive")
        return f"serial:{value:x}"
    if not text or len(text) > 64:
        raise AdminError(f"{text!r} is not a certificate name")
    return f"name:{text}"


def revoke(dsn_text: str, name_or_serial: str, timeout: float = 30.0) -> dict[str, Any]:
    """Put a certificate on the cluster's deny list (replicated through the log): every node
    refuses it at its hello and closes the connections it has. Returns {"target", "index",
    "already"}."""
    from raftsql.driver._client import Forbidden

    target = revocation_target(name_or_serial)
    try:
        return _admin_call(dsn_text, {"op": "revoke", "target": target}, timeout)
    except Forbidden as e:
        # The certificate this DSN uses was the one revoked: the node applied it and closed
        # our connection ("certificate 'NAME' (serial S) was revoked"). Done, not failed.
        kind, _, value = target.partition(":")
        said = str(e)
        if "was revoked" in said and (f"certificate {value!r}" in said if kind == "name"
                                      else f"serial {value})" in said):
            return {"target": target, "index": None, "already": False, "own": True}
        raise


# --------------------------------------------------------------------------- backup


def _backup_target(out_path: str) -> str:
    """Where a backup may be written: a new file or a regular one, replaced atomically
    (through a symbolic link, its target). Never a device, FIFO, socket or directory (replacing
    /dev/null or /dev/full with a file), nor a file in a node's data directory (the live
    database of a running node)."""
    path = os.path.realpath(os.path.abspath(out_path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise AdminError(f"{out_path} is {kind}: a backup is written to a new or regular file")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise AdminError(f"{os.path.dirname(os.path.abspath(out_path))} is not a directory: "
                         f"cannot write {out_path}")
    if os.path.exists(os.path.join(parent, "raft-log")) or os.path.exists(os.path.join(parent, "membership.json")):
        raise AdminError(f"{parent} is a node's data directory: write the backup elsewhere "
                         "(replacing a file there could replace a live node's database)")
    return path


def backup(dsn_text: str, out_path: str, *, timeout: float = 120.0, linearizable: bool = True,
           waiting: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Copy the database of one node to out_path (atomically: a temp file, checked against the
    node's sha256, fsynced, renamed). linearizable=True: the copy holds every write acknowledged
    before the call. waiting(message): called once if no node served the first round of
    attempts (the call goes on retrying until its timeout). Returns {"index", "size",
    "sha256", "node", "path"}."""
    import hashlib

    dsn, ctx = _parse(dsn_text)
    out_path = _backup_target(out_path)
    out_dir = os.path.dirname(out_path)
    deadline = time.monotonic() + timeout
    errors = []
    attempt = 0
    while time.monotonic() < deadline:
        if waiting is not None and attempt == len(dsn.hosts) and errors:
            waiting(f"no node served the backup yet ({errors[-1]}); retrying for up to "
                    f"{max(0.0, deadline - time.monotonic()):.0f} s more")
        host, port = dsn.hosts[attempt % len(dsn.hosts)]
        attempt += 1
        remaining = max(1.0, deadline - time.monotonic())
        try:
            conn = NodeConnection(host, port, ctx, min(5.0, remaining))
        except NodeUnreachable as e:
            if e.forbidden:
                raise AdminError(str(e)) from None
            errors.append(str(e))
            time.sleep(0.1)
            continue
        fd, tmp = tempfile.mkstemp(prefix=".raftsql-backup-", dir=out_dir)
        try:
            resp = conn.request({"op": "backup_begin", "linearizable": linearizable,
                                 "timeout_ms": int(min(remaining, 30.0) * 1000)}, remaining)
            if not resp.get("ok"):
                err = resp.get("error") or {}
                errors.append(f"{host}:{port}: {err.get('kind')}: {err.get('message')}")
                if err.get("kind") in (ErrorKind.BAD_REQUEST, ErrorKind.FORBIDDEN):
                    raise AdminError(errors[-1] if err.get("kind") == ErrorKind.BAD_REQUEST
                                     else str(err.get("message")))
                time.sleep(0.1)
                continue
            info = resp["result"]
            h = hashlib.sha256()
            offset, size = 0, int(info["size"])
            with os.fdopen(fd, "wb") as f:
                fd = -1
                while offset < size:
                    r = conn.request({"op": "backup_read", "token": info["token"], "offset": offset,
                                      "length": int(info.get("chunk_max") or (1 << 20))}, max(1.0, deadline - time.monotonic()))
                    if not r.get("ok"):
                        raise AdminError(f"backup_read failed: {r.get('error')}")
                    data = r["result"]["data"]
                    if not isinstance(data, bytes) or not data:
                        raise AdminError(f"backup stream from {host}:{port} ended early at byte {offset} of {size}")
                    f.write(data)
                    h.update(data)
                    offset += len(data)
                f.flush()
                os.fsync(f.fileno())
            if offset != size or h.hexdigest() != info["sha256"]:
                raise AdminError(f"backup from {host}:{port} is damaged (size {offset}/{size}, sha256 mismatch)")
            with contextlib.suppress(OSError):
                conn.request({"op": "backup_end", "token": info["token"]}, 5.0)
            os.replace(tmp, out_path)
            tmp = None
            dfd = os.open(out_dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            return {"index": info["index"], "size": size, "sha256": info["sha256"], "node": info["node"],
                    "path": out_path}
        except (ConnectionLost, NodeUnreachable) as e:
            if e.forbidden:
                raise AdminError(str(e)) from None
            errors.append(str(e))
        finally:
            if fd >= 0:
                os.close(fd)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            conn.close()
    raise AdminError(f"no node made a backup within {timeout:.0f}s: " + "; ".join(errors[-3:]))


# --------------------------------------------------------------------------- restore

# SQLite's own tables and raftsql's (sqlite_raftsql_*; _raftsql_* in files made before the rename).
_INTERNAL = ("sqlite_", "_raftsql_")


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _check_rows_fit(src: Any, schema: list[tuple], limit: int | None) -> None:
    """Before anything is written: AdminError if a row of a table to restore cannot travel in
    one request (the nodes' max_request_size), rather than failing midway with part of the
    data loaded and the cluster no longer empty."""
    if not limit:
        return
    for kind, name, tbl_name, _ in schema:
        if kind != "table" or name.startswith(_INTERNAL) or tbl_name.startswith(_INTERNAL):
            continue
        cols = [c[1] for c in src.execute(f"PRAGMA table_xinfo({_q(name)})") if c[6] == 0]
        if not cols:
            continue
        size = " + ".join(f"coalesce(length(CAST({_q(c)} AS BLOB)), 8)" for c in cols)
        biggest = src.execute(f"SELECT max({size}) FROM {_q(name)}").fetchone()[0] or 0
        if biggest + 1024 > limit:
            raise AdminError(
                f"table {name!r} has a row of about {biggest} bytes, and a request to the nodes "
                f"may hold {limit} bytes (their max_request_size): nothing was restored. Start "
                "the new cluster's nodes with a larger max_request_size (at most half their "
                "max_frame_size), or restore without that row")


def _unfinished_restore(client) -> str:
    """If the cluster's last restore began and never ended (interrupted), say so: its tables
    hold only part of that backup."""
    last = client.execute([(
        "SELECT operation, entry_index, detail FROM sqlite_raftsql_audit WHERE operation IN "
        "('restore_begin', 'restore_end') ORDER BY entry_index DESC LIMIT 1", [])])
    rows = last.get("rows") or []
    if last.get("error") or not rows or rows[0][0] != "restore_begin":
        return ""
    try:
        source = json.loads(rows[0][2]).get("source") or "a backup"
    except (TypeError, ValueError, AttributeError):
        source = "a backup"
    return (f". A restore of {source} began at log index {rows[0][1]} and never finished (it "
            "was interrupted): the cluster holds only part of it. Start a new, empty cluster "
            "(new data directories) and restore again")


def restore(dsn_text: str, in_path: str, *, batch_bytes: int = 256 * 1024, timeout: float = 60.0,
            progress=None) -> dict[str, Any]:
    """Load the SQLite file in_path into an empty cluster, through the log: the schema, then
    every table's rows (rowids kept) in atomic batches of about batch_bytes, then indexes,
    views and triggers, then user_version and application_id. Every node applies the same
    entries, so every node (and every node that joins later) ends with the same database.
    Returns {"tables", "rows", "index"}."""
    import sqlite3

    from raftsql.driver._client import ClientError, OutcomeUnknown

    if not os.path.isfile(in_path):
        raise AdminError(f"{in_path}: no such file")
    src = sqlite3.connect(f"file:{os.path.abspath(in_path)}?mode=ro", uri=True)
    client = _admin_client(dsn_text, timeout)
    last_index = 0

    def run(statements: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal last_index
        serial = None
        for _ in range(5):
            try:
                r = client.execute(statements, serial=serial)
            except OutcomeUnknown as e:
                serial = e.serial  # resend with the same serial: applied at most once
                continue
            if r.get("error"):
                raise AdminError(f"the cluster refused {statements[0][0][:200]!r}: {r['error'].get('message')}")
            last_index = max(last_index, int(r.get("index") or 0))
            return r
        raise AdminError("the cluster did not answer; the restore is incomplete")

    try:
        try:
            ok = src.execute("PRAGMA quick_check").fetchone()[0]
            schema = src.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema WHERE sql IS NOT NULL ORDER BY rowid").fetchall()
        except sqlite3.DatabaseError as e:
            raise AdminError(f"{in_path} is not a readable SQLite database: {e}") from None
        if ok != "ok":
            raise AdminError(f"{in_path} fails its integrity check: {ok}")
        existing = client.execute([(
            "SELECT name FROM sqlite_schema WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\'", [])])
        if existing.get("error"):
            raise AdminError(f"cannot read the cluster's schema: {existing['error'].get('message')}")
        if existing["rows"]:
            raise AdminError("the cluster is not empty (it has " + ", ".join(r[0] for r in existing["rows"][:5])
                             + "): restore seeds a new, empty cluster" + _unfinished_restore(client))
        _check_rows_fit(src, schema, client._conn.max_request if client._conn else None)
        for r in _user_schema(schema):
            if r[0] == "table" and r[3].lstrip().upper().startswith("CREATE VIRTUAL"):
                raise AdminError(f"table {r[1]!r} is a virtual table: restore does not support virtual tables yet")
        # Admins only, and recorded in the audit trail (before any write; server/admin.py).
        client._call({"op": "restore_begin", "source": os.path.basename(in_path),
                      "timeout_ms": max(1000, int(timeout * 500))}, timeout, None)
        try:
            tables, rows = _restore_rows(client, src, schema, in_path, timeout, batch_bytes,
                                         progress, run)
        except (AdminError, ClientError) as e:
            raise AdminError(
                f"{e}. The restore stopped halfway: the cluster now holds part of {in_path} (and "
                "whatever clients wrote to it meanwhile: a client's write can make a restored "
                "row collide). Start a new, empty cluster and restore again, with no client "
                "writing to it until the restore has ended") from None
        return {"tables": tables, "rows": rows, "index": last_index}
    finally:
        client.close()
        src.close()


def _user_schema(schema: list) -> list:
    return [row for row in schema if not row[2].startswith(_INTERNAL) and not row[1].startswith(_INTERNAL)]


def _restore_rows(client, src, schema, in_path, timeout, batch_bytes, progress,
                  run) -> tuple[int, int]:
    """restore's writes, after its start is recorded: the schema, the rows, the rest.
    Returns (tables, rows) restored."""
    import sqlite3

    user = _user_schema(schema)
    tables = [r for r in user if r[0] == "table"]
    if tables:
        run([(r[3], []) for r in tables])
    rows_total = 0
    for _, name, _, _ in tables:
        cols = [c[1] for c in src.execute(f"PRAGMA table_xinfo({_q(name)})") if c[6] == 0]
        lower = {c.lower() for c in cols}
        try:
            src.execute(f"SELECT rowid FROM {_q(name)} LIMIT 0")
            alias = next((a for a in ("rowid", "_rowid_", "oid") if a not in lower), None)
        except sqlite3.OperationalError:
            alias = None  # WITHOUT ROWID
        select_cols = ([alias] if alias else []) + [_q(c) for c in cols]
        insert = (f"INSERT INTO {_q(name)} ({', '.join(select_cols)}) "
                  f"VALUES ({', '.join('?' * len(select_cols))})")
        batch: list[tuple[str, Any]] = []
        size = 0
        for row in src.execute(f"SELECT {', '.join(select_cols)} FROM {_q(name)}"):
            batch.append((insert, list(row)))
            size += 16 + sum(len(v) if isinstance(v, str | bytes) else 8 for v in row)
            if size >= batch_bytes:
                run(batch)
                rows_total += len(batch)
                batch, size = [], 0
                if progress:
                    progress(name, rows_total)
        if batch:
            run(batch)
            rows_total += len(batch)
    rest = [(r[3], []) for r in user if r[0] in ("index", "view", "trigger")]
    if rest:
        run(rest)
    pragmas = []
    for p in ("user_version", "application_id"):
        v = src.execute(f"PRAGMA {p}").fetchone()[0]
        if v:
            pragmas.append((f"PRAGMA {p} = {int(v)}", []))
    if pragmas:
        run(pragmas)
    client._call({"op": "restore_end", "source": os.path.basename(in_path), "tables": len(tables),
                  "rows": rows_total, "timeout_ms": max(1000, int(timeout * 500))}, timeout, None)
    return len(tables), rows_total
