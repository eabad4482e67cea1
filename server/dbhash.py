"""A content hash of a node's database, for comparing replicas (tests, the `hash` request):
equal on two nodes at the same applied index, or they diverged."""

from __future__ import annotations

import hashlib

import apsw
import msgpack

from raftsql.server.sandbox import quote_ident


def content_hash(conn: apsw.Connection, tag: str) -> str:
    """sha256 over the schema (without root pages) and every table's rows in key order,
    raftsql's own tables included. `tag` marks the statements as internal (the caller has the
    authorizer bypassed)."""
    h = hashlib.sha256()
    pack = msgpack.Packer(use_bin_type=True).pack
    for row in conn.execute(
        tag + "SELECT type, name, tbl_name, sql FROM main.sqlite_schema ORDER BY type, name"
    ):
        h.update(pack(["schema", *row]))
    tables = conn.execute(
        tag + "SELECT name, wr FROM pragma_table_list WHERE schema='main' "
        "AND type IN ('table', 'shadow') AND name != 'sqlite_schema' ORDER BY name"
    ).fetchall()
    for name, without_rowid in tables:
        h.update(pack(["table", name]))
        for row in conn.execute(tag + _dump_sql(conn, tag, name, bool(without_rowid))):
            h.update(pack(row))
    return h.hexdigest()


def _dump_sql(conn: apsw.Connection, tag: str, name: str, without_rowid: bool) -> str:
    q = quote_ident(name)
    info = conn.execute(tag + "SELECT name, pk FROM pragma_table_info(?)", (name,)).fetchall()
    # Every value as (type, bytes): TEXT that is not valid UTF-8 cannot come back as str.
    values = ", ".join(f"typeof({quote_ident(c)}), CAST({quote_ident(c)} AS BLOB)" for c, _ in info)
    if without_rowid:
        pk = [quote_ident(c) for c, k in sorted(info, key=lambda r: r[1]) if k > 0]
        return f"SELECT {values} FROM {q} ORDER BY {', '.join(pk)}"
    names = {c.lower() for c, _ in info}
    for alias in ("rowid", "_rowid_", "oid"):
        if alias not in names:
            return f"SELECT {alias}, {values} FROM {q} ORDER BY {alias}"
    order = ", ".join(quote_ident(c) for c, _ in info)
    return f"SELECT {values} FROM {q} ORDER BY {order}"
