"""raftsql's own tables in every node's database (server/DESIGN.md, "raftsql's own tables"):
the applied index and entry clocks (sqlite_raftsql_meta), exactly-once sessions (_sessions), the
last index that wrote each table (_tables, for transactions), the address book (_members), the
audit trail (_audit), the revoked certificates (_revoked) and the cluster's id (_cluster)
(server/records.py).
They carry SQLite's reserved sqlite_ prefix, so no user can create, drop or alter them and
listings skip them; creating them needs the writable schema, which the caller switches on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from raftsql.server.sandbox import INTERNAL_TABLES, LEGACY_PREFIX


def create_internal_tables(internal: Callable[..., list[Any]]) -> None:
    """Create (or upgrade and rename, from the _raftsql_* names) the tables; `internal` runs one
    of raftsql's own statements on the write connection."""
    internal("BEGIN IMMEDIATE")
    # Databases made before the rename keep these tables as _raftsql_*: upgrade, then
    # rename them in place. SQLite lets no one (raftsql included) alter or drop a sqlite_*
    # table, so a later format change adds tables instead. Every node renames its own file
    # when it opens it: upgrade all nodes together.
    legacy = {
        r[0] for r in internal(
            "SELECT name FROM sqlite_schema WHERE type='table' AND name IN "
            f"({', '.join(repr(f'{LEGACY_PREFIX}{t}') for t in INTERNAL_TABLES)})"
        )
    }
    if "_raftsql_meta" in legacy:
        cols = [r[1] for r in internal("PRAGMA table_info(_raftsql_meta)")]
        if "session_ms" not in cols:
            # Format 1 (no session clock): start the session clock at the entry time. Every
            # node must be upgraded at the same applied index (stop the cluster, upgrade all).
            internal("ALTER TABLE _raftsql_meta ADD COLUMN session_ms INTEGER NOT NULL DEFAULT 0")
            internal("UPDATE _raftsql_meta SET session_ms=time_ms, format=2")
    for name in sorted(legacy):
        internal(f"ALTER TABLE {name} RENAME TO sqlite{name}")
    internal(
        "CREATE TABLE IF NOT EXISTS sqlite_raftsql_meta("
        "id INTEGER PRIMARY KEY CHECK (id = 1), applied_index INTEGER NOT NULL, "
        "time_ms INTEGER NOT NULL, gc_ms INTEGER NOT NULL, format INTEGER NOT NULL, "
        "session_ms INTEGER NOT NULL)"
    )
    internal("INSERT OR IGNORE INTO sqlite_raftsql_meta VALUES(1, 0, 0, 0, 2, 0)")
    # WITHOUT ROWID and no index on last_ms: an upsert touches one b-tree page; the expiry
    # scan runs once per SESSION_GC_INTERVAL_MS of leader time.
    internal(
        "CREATE TABLE IF NOT EXISTS sqlite_raftsql_sessions("
        "client_id TEXT PRIMARY KEY, serial INTEGER NOT NULL, result BLOB NOT NULL, "
        "last_ms INTEGER NOT NULL) WITHOUT ROWID"
    )
    # The last log index whose entry wrote each table (lower-case name; the schema as
    # SCHEMA): what a transaction's commit checks its read set against.
    internal(
        "CREATE TABLE IF NOT EXISTS sqlite_raftsql_tables("
        "name TEXT PRIMARY KEY, modified_index INTEGER NOT NULL) WITHOUT ROWID"
    )
    # The cluster's address book, from the CONF_CHANGE entries (MemberChange).
    internal(
        "CREATE TABLE IF NOT EXISTS sqlite_raftsql_members("
        "node_id TEXT PRIMARY KEY, address TEXT NOT NULL) WITHOUT ROWID"
    )
    # Membership changes, backups, restores and revocations: who (certificate name and
    # serial), when (the entry's leader time) and what (JSON), keyed by log index.
    internal(
        "CREATE TABLE IF NOT EXISTS sqlite_raftsql_audit("
        "entry_index INTEGER PRIMARY KEY, time_ms INTEGER NOT NULL, operation TEXT NOT NULL, "
        "by_name TEXT, by_serial TEXT, detail TEXT NOT NULL)"
    )
    # The deny list: "name:CN" or "serial:HEX"; refused at the hello on every node.
    internal(
        "CREATE TABLE IF NOT EXISTS sqlite_raftsql_revoked("
        "target TEXT PRIMARY KEY, entry_index INTEGER NOT NULL, time_ms INTEGER NOT NULL, "
        "by_name TEXT, by_serial TEXT) WITHOUT ROWID"
    )
    # The cluster's id, named once by the first leader (server/records.py): peers holding
    # another cluster's data are refused at the hello.
    internal(
        "CREATE TABLE IF NOT EXISTS sqlite_raftsql_cluster("
        "id INTEGER PRIMARY KEY CHECK (id = 1), cluster_id TEXT NOT NULL, "
        "entry_index INTEGER NOT NULL, time_ms INTEGER NOT NULL)"
    )
    internal("COMMIT")
