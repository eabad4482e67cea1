"""Administrative calls used by the CLI (status), on top of the low-level connection."""

from __future__ import annotations

from typing import Any

from raftsql.driver._conn import DSN, NodeConnection, NodeUnreachable
from raftsql.driver._tls import client_context, default_paths


def context_for(dsn: DSN):
    certs = dsn.params.get("certs")
    if not certs:
        raise ValueError("the DSN needs ?certs=DIR (the directory made by `raftsql certs init`)")
    return client_context(*default_paths(certs))


def cluster_status(dsn_text: str, timeout: float = 3.0) -> list[dict[str, Any]]:
    dsn = DSN.parse(dsn_text)
    ctx = context_for(dsn)
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
