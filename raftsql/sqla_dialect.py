"""SQLAlchemy 2.x dialect for raftsql: SQLAlchemy's SQLite dialect (same SQL, types and
reflection) on top of raftsql.driver instead of the stdlib sqlite3 module.

Registered as the entry points ``raftsql`` and ``sqlite.raftsql`` (pyproject.toml), so after
``pip install 'raftsql[sqlalchemy]'`` this works with no import::

    engine = create_engine("raftsql://h1:p1/?host=h2:p2&host=h3:p3&certs=DIR")
    engine = create_engine("raftsql:///h1:p1,h2:p2,h3:p3?certs=DIR")   # the same cluster

SQLAlchemy's URL grammar reads ``raftsql://h1:p1,h2:p2/`` as host h1 with the port
"p1,h2:p2" and refuses it (int() of the port) before any dialect code runs, so a cluster's
hosts go either in ``host=`` query parameters (psycopg's multi-host convention) or in the
database part after a third slash. ``sqlalchemy_url(dsn)`` turns a driver DSN into a URL.

Query parameters: certs, cafile, certfile, keyfile, timeout, consistency, autocommit
(true: every connection starts in AUTOCOMMIT; false: PEP 249 transactions that include DDL;
legacy, the default: sqlite3's, as the pysqlite dialect), detect_types.

The dialect's ``name`` is "sqlite" (its driver is "raftsql"), so everything that keys on the
backend's name (SQL compilation, Alembic's SQLiteImpl, pandas) treats it as SQLite.
See README.md, "SQLAlchemy, pandas and Alembic", and driver/DESIGN.md.
"""

from __future__ import annotations

import re
import types
import weakref
from typing import Any

from sqlalchemy import exc, pool
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import URL

# The oldest SQLite a raftsql node can run (apsw>=3.45 in pyproject.toml). SQLiteDialect reads
# dbapi.sqlite_version_info when it is created, before any connection exists; initialize()
# replaces it with the cluster's own version (select sqlite_version()).
MIN_SERVER_SQLITE = (3, 45, 0)

_DRIVER_ARGS = {
    "certs": str,
    "cafile": str,
    "certfile": str,
    "keyfile": str,
    "timeout": float,
    "consistency": str,
    "detect_types": int,
}
_LEGACY = -1  # raftsql.driver.LEGACY_TRANSACTION_CONTROL


def _dbapi_module() -> types.ModuleType:
    """raftsql.driver as SQLAlchemy's `dbapi`, plus the sqlite_version_info the SQLite dialect
    reads before connecting (the driver has no local SQLite library to report)."""
    import raftsql.driver as driver

    mod = types.ModuleType("raftsql.driver", driver.__doc__)
    mod.__dict__.update({k: v for k, v in vars(driver).items() if not k.startswith("__")})
    mod.sqlite_version_info = MIN_SERVER_SQLITE
    mod.sqlite_version = ".".join(map(str, MIN_SERVER_SQLITE))
    return mod


def _hosts_from_url(url: URL) -> list[str]:
    hosts: list[str] = []
    if url.host:
        hosts.append(f"{url.host}:{url.port}" if url.port else url.host)
    extra = url.query.get("host", ())
    hosts.extend([extra] if isinstance(extra, str) else list(extra))
    if url.database:
        hosts.extend(h for h in url.database.split(",") if h.strip())
    out = []
    for h in hosts:
        h = h.strip()
        host, sep, port = h.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise exc.ArgumentError(f"raftsql URL host {h!r} must be host:port")
        out.append(h)
    if not out:
        raise exc.ArgumentError(
            "a raftsql URL names its nodes: raftsql://h1:p1/?host=h2:p2&certs=DIR "
            "or raftsql:///h1:p1,h2:p2?certs=DIR")
    return out


def sqlalchemy_url(dsn: str, **query: str) -> URL:
    """The SQLAlchemy URL for a driver DSN (``raftsql://h1:p1,h2:p2/?certs=DIR``, what
    `raftsql cluster up` prints), with extra query parameters."""
    from raftsql.driver._conn import DSN

    d = DSN.parse(dsn)
    hosts = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in d.hosts]
    params = dict(d.params, **query)
    return URL.create("raftsql", database=",".join(hosts), query=params)


class RaftSQLDialect(SQLiteDialect_pysqlite):
    """SQLite's dialect over raftsql.driver (see the module docstring)."""

    driver = "raftsql"
    supports_statement_cache = True

    @classmethod
    def import_dbapi(cls) -> Any:
        return _dbapi_module()

    @classmethod
    def get_pool_class(cls, url: URL) -> type[pool.Pool]:
        # Every connection reaches the same replicated database (sqlite's :memory: rule of one
        # connection per thread does not apply).
        return pool.QueuePool

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        # autocommit= in the URL: the transactional mode SERIALIZABLE restores (legacy or False).
        self._txn_autocommit: bool | int = _LEGACY
        # Connections set to READ UNCOMMITTED (see get_isolation_level_values).
        self._read_uncommitted: weakref.WeakSet[Any] = weakref.WeakSet()

    # ------------------------------------------------------------------ connecting

    def create_connect_args(self, url: URL) -> tuple[list[Any], dict[str, Any]]:
        opts: dict[str, Any] = {}
        query = dict(url.query)
        query.pop("host", None)
        for key, type_ in _DRIVER_ARGS.items():
            if key in query:
                value = query.pop(key)
                try:
                    opts[key] = type_(value)
                except ValueError:
                    raise exc.ArgumentError(f"raftsql URL: {key}={value!r} is not a {type_.__name__}") from None
        if "isolation_level" in query:  # as pysqlite: the driver's own (sqlite3's) value
            level = query.pop("isolation_level")
            opts["isolation_level"] = None if level.upper() in ("NONE", "AUTOCOMMIT") else level
        if "autocommit" in query:
            value = str(query.pop("autocommit")).strip().lower()
            if value in ("1", "true", "yes", "on"):
                opts["autocommit"] = True
            elif value in ("0", "false", "no", "off"):
                opts["autocommit"] = self._txn_autocommit = False
            elif value in ("legacy", "-1"):
                opts["autocommit"] = _LEGACY
            else:
                raise exc.ArgumentError(f"raftsql URL: autocommit must be true, false or legacy, not {value!r}")
        if query:
            raise exc.ArgumentError(
                "raftsql URL: unknown query parameter(s) " + ", ".join(sorted(query))
                + f"; known: host, isolation_level, autocommit, {', '.join(_DRIVER_ARGS)}")
        opts["hosts"] = _hosts_from_url(url)
        return [], opts

    def on_connect(self) -> None:
        # pysqlite registers regexp() and floor() as Python functions on each connection; a
        # function here would run in this process, not on the nodes (the nodes' SQLite has
        # floor(); REGEXP has no implementation there, see README).
        return None

    def _get_server_version_info(self, connection: Any) -> tuple[int, ...]:
        version = connection.exec_driver_sql("select sqlite_version()").scalar()
        return tuple(int(x) for x in re.findall(r"\d+", version)[:3])

    def initialize(self, connection: Any) -> None:
        super().initialize(connection)
        v = self.server_version_info or MIN_SERVER_SQLITE
        self.insert_returning = self.update_returning = self.delete_returning = v >= (3, 35)

    def get_schema_names(self, connection: Any, **kw: Any) -> list[str]:
        # One replicated database: no ATTACH, and TEMP objects are refused (PRAGMA
        # database_list, which SQLite's dialect asks, is refused by the nodes).
        return ["main"]

    # ------------------------------------------------------------------ isolation levels

    def get_isolation_level_values(self, dbapi_connection: Any) -> list[str]:
        # Every raftsql transaction is serializable (optimistic, checked at commit). SQLite's
        # READ UNCOMMITTED (PRAGMA read_uncommitted, which a node refuses) only changes anything
        # for connections sharing a cache in one process; on a file without shared cache it
        # reads as SERIALIZABLE does. So it is accepted, remembered and reported, and changes
        # nothing, as there.
        return ["SERIALIZABLE", "READ UNCOMMITTED", "AUTOCOMMIT"]

    def get_isolation_level(self, dbapi_connection: Any) -> str:
        if self.detect_autocommit_setting(dbapi_connection):
            return "AUTOCOMMIT"
        return "READ UNCOMMITTED" if dbapi_connection in self._read_uncommitted else "SERIALIZABLE"

    def set_isolation_level(self, dbapi_connection: Any, level: str) -> None:
        if level == "READ UNCOMMITTED":
            self._read_uncommitted.add(dbapi_connection)
        else:
            self._read_uncommitted.discard(dbapi_connection)
        if level == "AUTOCOMMIT":
            dbapi_connection.autocommit = True
        else:
            dbapi_connection.autocommit = self._txn_autocommit
            if self._txn_autocommit == _LEGACY and dbapi_connection.isolation_level is None:
                dbapi_connection.isolation_level = ""

    def detect_autocommit_setting(self, dbapi_conn: Any) -> bool:
        return dbapi_conn.autocommit is True or (
            dbapi_conn.autocommit == _LEGACY and dbapi_conn.isolation_level is None)

    # ------------------------------------------------------------------ savepoints

    def do_savepoint(self, connection: Any, name: str) -> None:
        # sqlite3's legacy mode sends no BEGIN before a SAVEPOINT, so a SAVEPOINT with no
        # transaction open starts one, and its RELEASE commits everything (pysqlite's broken
        # begin_nested()). Open the transaction first, so the savepoint nests inside it.
        dbapi_conn = connection.connection.dbapi_connection
        if not self.detect_autocommit_setting(dbapi_conn) and not dbapi_conn.in_transaction:
            dbapi_conn.execute("BEGIN")
        super().do_savepoint(connection, name)

    # ------------------------------------------------------------------ failures

    def is_disconnect(self, e: Exception, connection: Any, cursor: Any) -> bool:
        """Unavailable (no node served the request; nothing was applied) invalidates the
        pooled connection, as a lost server connection does elsewhere: SQLAlchemy then
        reconnects (pool_pre_ping, or the next checkout) and the application can run the
        transaction again. OutcomeUnknown is not a disconnect: the connection must stay to
        resend() the write with its serial (see README)."""
        dbapi = self.loaded_dbapi
        if isinstance(e, dbapi.Unavailable):
            return True
        return isinstance(e, dbapi.ProgrammingError) and "Cannot operate on a closed database." in str(e)


def resend(connection: Any, error: BaseException) -> Any:
    """Resend a write whose outcome is unknown, on the SQLAlchemy Connection (or Session) that
    raised it, with its original serial: applied at most once; if it had been applied, its
    stored result comes back. `error` is the sqlalchemy.exc.OperationalError (or the driver's
    OutcomeUnknown it wraps). Returns the driver cursor of the resent write. Call it before the
    connection writes anything else and before the Session is closed or rolled back."""
    orig = getattr(error, "orig", error)
    if hasattr(connection, "connection") and callable(connection.connection):
        connection = connection.connection()  # a Session: its Connection
    return connection.connection.driver_connection.resend(orig)


dialect = RaftSQLDialect

__all__ = ["RaftSQLDialect", "dialect", "resend", "sqlalchemy_url"]
