"""Code written for the stdlib sqlite3 module runs the same on raftsql.

Each test is sqlite3 code a user already has. It runs twice through the `connect` fixture:
first on sqlite3 (a file in tmp_path), which proves the expectation, then on the driver against
the shared real 3-node cluster, which must give the same outcome. `connect.db` is the module
(for its exception classes). Transaction control is sqlite3's legacy one (the default before
Python 3.12, and the default of both here): isolation_level, DDL outside the implicit
transaction, an implicit BEGIN before INSERT/UPDATE/DELETE/REPLACE only."""

from __future__ import annotations

import sqlite3
import uuid

import pytest

import raftsql.driver


@pytest.fixture(params=["sqlite3", "raftsql"])
def connect(request, tmp_path):
    """connect(**kw): a new connection to one database (the same one for every call in a test)."""
    opened = []
    if request.param == "sqlite3":
        path = tmp_path / "habits.db"

        def _open(**kw):
            return sqlite3.connect(path, **kw)
        module = sqlite3
    else:
        dsn = request.getfixturevalue("cluster").dsn

        def _open(**kw):
            return raftsql.driver.connect(dsn, timeout=20, **kw)
        module = raftsql.driver
        _open.dsn = dsn
        _open.admin_dsn = request.getfixturevalue("cluster").admin_dsn  # backups need admin

    def _connect(**kw):
        c = _open(**kw)
        opened.append(c)
        return c

    _connect.db = module
    _connect.dsn = getattr(_open, "dsn", None)
    _connect.admin_dsn = getattr(_open, "admin_dsn", None)
    yield _connect
    for c in opened:
        c.close()


@pytest.fixture
def table():
    return "h_" + uuid.uuid4().hex[:10]


def _rows(connect, sql):
    """What a new connection reads (so only committed data)."""
    c = connect()
    try:
        return c.execute(sql).fetchall()
    finally:
        c.close()


# --------------------------------------------------------------------------- A: isolation_level


def test_isolation_level_none_then_writes_and_close_keeps_every_row(connect, table):
    conn = connect()
    conn.isolation_level = None  # autocommit: no commit() follows
    conn.execute(f"CREATE TABLE {table} (x)")
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    conn.executemany(f"INSERT INTO {table} VALUES (?)", [(2,), (3,)])
    conn.execute(f"UPDATE {table} SET x = x * 10 WHERE x = 3")
    assert conn.isolation_level is None and not conn.in_transaction
    conn.close()
    assert _rows(connect, f"SELECT x FROM {table} ORDER BY x") == [(1,), (2,), (30,)]


def test_connect_with_isolation_level_none_is_autocommit(connect, table):
    conn = connect(isolation_level=None)
    assert conn.isolation_level is None
    conn.execute(f"CREATE TABLE {table} (x)")
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    assert not conn.in_transaction
    assert _rows(connect, f"SELECT x FROM {table}") == [(1,)]  # before any commit or close
    conn.rollback()  # nothing to roll back
    assert _rows(connect, f"SELECT x FROM {table}") == [(1,)]


def test_setting_isolation_level_none_commits_pending_writes(connect, table):
    conn = connect()
    conn.execute(f"CREATE TABLE {table} (x)")
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    assert conn.in_transaction and _rows(connect, f"SELECT x FROM {table}") == []
    conn.isolation_level = None
    assert not conn.in_transaction
    assert _rows(connect, f"SELECT x FROM {table}") == [(1,)]
    conn.execute(f"INSERT INTO {table} VALUES (2)")
    conn.close()
    assert _rows(connect, f"SELECT x FROM {table} ORDER BY x") == [(1,), (2,)]


def test_isolation_level_values_and_errors(connect):
    conn = connect()
    assert conn.isolation_level == ""  # the default
    for value, stored in (("deferred", "DEFERRED"), ("Immediate", "IMMEDIATE"),
                          ("EXCLUSIVE", "EXCLUSIVE"), ("", ""), (None, None)):
        conn.isolation_level = value
        assert conn.isolation_level == stored
    assert connect(isolation_level="immediate").isolation_level == "IMMEDIATE"
    for bad in (1, b"DEFERRED", 1.5):
        with pytest.raises(TypeError, match="^isolation_level must be str or None$"):
            conn.isolation_level = bad
        with pytest.raises(TypeError, match="^isolation_level must be str or None$"):
            connect(isolation_level=bad)
    levels = "^isolation_level string must be '', 'DEFERRED', 'IMMEDIATE', or 'EXCLUSIVE'$"
    for bad in ("SERIALIZABLE", "BEGIN", " DEFERRED"):
        with pytest.raises(ValueError, match=levels):
            conn.isolation_level = bad
        with pytest.raises(ValueError, match=levels):
            connect(isolation_level=bad)
    with pytest.raises(ValueError, match="^embedded null character$"):
        conn.isolation_level = "DEFERRED\0"
    assert conn.isolation_level is None  # unchanged by the failures
    with pytest.raises(AttributeError, match="cannot delete attribute"):
        del conn.isolation_level
    conn.close()
    with pytest.raises(connect.db.ProgrammingError, match="Cannot operate on a closed database"):
        conn.isolation_level = None


def test_an_isolation_level_opens_a_transaction_before_a_write(connect, table):
    conn = connect(isolation_level="IMMEDIATE")
    conn.execute(f"CREATE TABLE {table} (x)")
    conn.execute(f"SELECT * FROM {table}").fetchall()
    assert not conn.in_transaction  # reads open none
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    assert conn.in_transaction
    conn.rollback()
    conn.execute(f"INSERT INTO {table} VALUES (2)")
    conn.commit()
    assert _rows(connect, f"SELECT x FROM {table}") == [(2,)]


def test_explicit_begin_with_isolation_level_none_and_the_context_manager(connect, table):
    conn = connect(isolation_level=None)
    conn.execute(f"CREATE TABLE {table} (x)")
    conn.execute("BEGIN")
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    assert conn.in_transaction and _rows(connect, f"SELECT x FROM {table}") == []
    with conn:  # commits the explicit transaction
        conn.execute(f"INSERT INTO {table} VALUES (2)")
    assert not conn.in_transaction
    assert _rows(connect, f"SELECT x FROM {table} ORDER BY x") == [(1,), (2,)]
    with pytest.raises(connect.db.OperationalError, match="cannot commit - no transaction is active"):
        conn.execute("COMMIT")


# --------------------------------------------------------------------------- B: DDL


def test_create_table_if_not_exists_then_insert_in_the_default_mode(connect, table):
    conn = connect()
    conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (x)")
    assert not conn.in_transaction  # DDL ran outside the implicit transaction: it is applied
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    assert conn.in_transaction
    assert conn.execute(f"SELECT x FROM {table}").fetchall() == [(1,)]
    assert _rows(connect, f"SELECT x FROM {table}") == []  # the table exists, the row is pending
    conn.close()  # no commit: the INSERT is discarded, the table stays
    assert _rows(connect, f"SELECT x FROM {table}") == []
    conn = connect()  # the same code again, with the table there
    conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (x)")
    conn.execute(f"INSERT INTO {table} VALUES (2)")
    conn.commit()
    assert _rows(connect, f"SELECT x FROM {table}") == [(2,)]


@pytest.mark.parametrize("isolation_level", [None, ""])
def test_in_an_explicit_transaction_later_statements_see_the_new_table(connect, table,
                                                                       isolation_level):
    conn = connect(isolation_level=isolation_level)
    conn.execute("BEGIN")
    conn.execute(f"CREATE TABLE {table} (x)")
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    conn.execute(f"CREATE INDEX {table}_x ON {table} (x)")
    assert conn.execute(f"SELECT x FROM {table}").fetchall() == [(1,)]
    conn.execute("ROLLBACK")  # the table goes too
    with pytest.raises(connect.db.OperationalError, match=f"no such table: {table}"):
        conn.execute(f"SELECT x FROM {table}")
    conn.execute("BEGIN")
    conn.execute(f"CREATE TABLE {table} (x)")
    conn.execute(f"INSERT INTO {table} VALUES (2)")
    conn.execute("COMMIT")
    assert _rows(connect, f"SELECT x FROM {table}") == [(2,)]


def test_ddl_after_a_write_joins_the_open_transaction(connect, table):
    conn = connect()
    conn.execute(f"CREATE TABLE {table} (x)")
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    conn.execute(f"CREATE TABLE {table}_b (y)")  # a transaction is open: inside it
    conn.execute(f"INSERT INTO {table}_b VALUES (2)")
    assert conn.execute(f"SELECT y FROM {table}_b").fetchall() == [(2,)]
    conn.rollback()
    assert _rows(connect, f"SELECT x FROM {table}") == []
    with pytest.raises(connect.db.OperationalError, match=f"no such table: {table}_b"):
        _rows(connect, f"SELECT y FROM {table}_b")


def test_a_failed_insert_still_opened_the_transaction(connect, table):
    conn = connect()
    conn.execute(f"CREATE TABLE {table} (x UNIQUE)")
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    conn.commit()
    with pytest.raises(connect.db.IntegrityError, match="UNIQUE constraint failed"):
        conn.execute(f"INSERT INTO {table} VALUES (1)")
    assert conn.in_transaction  # sqlite3's BEGIN ran before the INSERT
    with pytest.raises(connect.db.OperationalError,
                       match="cannot start a transaction within a transaction"):
        conn.execute("BEGIN")
    conn.execute(f"CREATE TABLE {table}_b (y)")  # inside the open transaction
    conn.rollback()
    assert not conn.in_transaction
    with pytest.raises(connect.db.OperationalError, match=f"no such table: {table}_b"):
        _rows(connect, f"SELECT y FROM {table}_b")


# --------------------------------------------------------------------------- C: fetch*


def test_fetch_after_a_statement_without_rows_returns_none_or_empty(connect, table):
    conn = connect()
    cur = conn.cursor()
    assert (cur.fetchone(), cur.fetchall(), cur.fetchmany()) == (None, [], [])
    for sql in (f"CREATE TABLE {table} (x)", f"INSERT INTO {table} VALUES (1)",
                f"UPDATE {table} SET x = 2", f"DELETE FROM {table} WHERE x = 5"):
        cur.execute(sql)
        assert cur.description is None
        assert (cur.fetchone(), cur.fetchall(), cur.fetchmany(3)) == (None, [], []), sql
        assert list(cur) == []
    cur.execute(f"SELECT x FROM {table} WHERE x > 100")
    assert (cur.fetchone(), cur.fetchall(), cur.fetchmany(2)) == (None, [], [])
    cur.close()
    with pytest.raises(connect.db.ProgrammingError, match="Cannot operate on a closed cursor"):
        cur.fetchone()


# --------------------------------------------------------------------------- D: WITH ... SELECT


def test_with_select_is_a_read(connect, table):
    conn = connect()
    cur = conn.execute("WITH x(a) AS (SELECT 1 UNION ALL SELECT 2) SELECT a FROM x ORDER BY a")
    assert cur.fetchall() == [(1,), (2,)] and cur.description[0][0] == "a"
    assert cur.rowcount == -1 and not conn.in_transaction  # a read opens no transaction
    with pytest.raises(connect.db.OperationalError, match=f"no such table: {table}") as info:
        conn.execute(f"WITH x(a) AS (SELECT 1) SELECT * FROM x, {table}")
    assert type(info.value) is connect.db.OperationalError  # an SQL error, nothing unknown
    with pytest.raises(connect.db.ProgrammingError,
                       match="executemany\\(\\) can only execute DML statements"):
        conn.executemany("WITH x(a) AS (SELECT ?) SELECT a FROM x", [(1,), (2,)])
    conn.execute(f"CREATE TABLE {table} (x)")
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    # In the open transaction, a WITH ... SELECT sees its uncommitted rows.
    assert conn.execute(f"WITH y AS (SELECT x FROM {table}) SELECT * FROM y").fetchall() == [(1,)]
    conn.commit()


def test_with_insert_is_not_dml_to_legacy_transaction_control(connect, table):
    conn = connect()
    conn.execute(f"CREATE TABLE {table} (x)")
    # sqlite3 opens a transaction only before statements that start with INSERT, UPDATE,
    # DELETE or REPLACE: this one runs (and is committed) on its own.
    conn.execute(f"WITH v(a) AS (VALUES (1), (2)) INSERT INTO {table} SELECT a FROM v")
    assert not conn.in_transaction
    conn.close()
    assert _rows(connect, f"SELECT x FROM {table} ORDER BY x") == [(1,), (2,)]


# --------------------------------------------------------------------------- AUTOINCREMENT tables


def test_an_autoincrement_table_can_be_filled_renamed_and_dropped(connect, table, request):
    conn = connect()
    conn.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)")
    conn.executemany(f"INSERT INTO {table} (v) VALUES (?)", [("a",), ("b",), ("c",)])
    conn.commit()
    conn.execute(f"DELETE FROM {table} WHERE v = 'c'")
    conn.execute(f"INSERT INTO {table} (v) VALUES ('d')")  # AUTOINCREMENT: id 4, never 3 again
    conn.commit()
    assert _rows(connect, f"SELECT id, v FROM {table} ORDER BY id") == [(1, "a"), (2, "b"), (4, "d")]
    renamed = table + "_r"
    conn.execute(f"ALTER TABLE {table} RENAME TO {renamed}")
    assert _rows(connect, f"SELECT seq FROM sqlite_sequence WHERE name = '{renamed}'") == [(4,)]
    conn.execute(f"DELETE FROM sqlite_sequence WHERE name = '{renamed}'")  # reset the counter
    conn.commit()
    conn.execute(f"INSERT INTO {renamed} (v) VALUES ('e')")
    conn.commit()
    assert _rows(connect, f"SELECT max(id) FROM {renamed}") == [(5,)]  # max(rowid) + 1
    conn.execute(f"DROP TABLE {renamed}")
    conn.commit()
    assert _rows(connect, f"SELECT count(*) FROM sqlite_sequence WHERE name = '{renamed}'") == [(0,)]
    if connect.db is raftsql.driver:
        cluster = request.getfixturevalue("cluster")
        hashes = cluster.hashes()
        assert len(set(hashes.values())) == 1, hashes  # schema and content equal on every node


# --------------------------------------------------------------------------- raftsql's own tables


def test_raftsqls_own_tables_stay_out_of_listings_dumps_and_backups(connect, table, tmp_path):
    conn = connect()
    conn.execute(f"CREATE TABLE {table} (x)")
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    conn.commit()
    listed = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    assert not [n for n in listed if "raftsql" in n], listed  # what .tables and reflection use
    assert table in listed
    if connect.db is sqlite3:
        dump = list(conn.iterdump())
    else:
        # What a backup for use elsewhere holds, dumped with sqlite3's own iterdump.
        import subprocess
        import sys

        out = tmp_path / "backup.db"
        subprocess.run([sys.executable, "-m", "raftsql.cli", "backup", connect.admin_dsn, str(out)],
                       check=True, capture_output=True, timeout=60)
        dump = list(sqlite3.connect(out).iterdump())
    assert not [line for line in dump if "raftsql" in line]
    assert any(table in line for line in dump)


@pytest.mark.parametrize("isolation_level", [None, ""])
def test_a_failed_write_keeps_what_sqlite_keeps(connect, table, isolation_level):
    """In autocommit mode, sqlite3 commits the parameter sets of an executemany before the
    failing one and the rows INSERT OR FAIL inserted before its conflict; an ABORT (the default)
    keeps nothing of its statement. In the legacy mode the same rows wait in the transaction."""
    conn = connect(isolation_level=isolation_level)
    conn.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, v)")
    db = connect.db
    with pytest.raises(db.IntegrityError):
        conn.executemany(f"INSERT INTO {table} VALUES (?, ?)", [(1, "a"), (2, "b"), (2, "dup"), (3, "c")])
    with pytest.raises(db.IntegrityError):
        conn.execute(f"INSERT OR FAIL INTO {table} VALUES (10, 'x'), (11, 'x'), (1, 'dup'), (12, 'x')")
    with pytest.raises(db.IntegrityError):
        conn.execute(f"INSERT INTO {table} VALUES (20, 'y'), (21, 'y'), (2, 'dup')")
    with pytest.raises(db.IntegrityError):
        conn.executemany(f"INSERT INTO {table} VALUES (?, ?)", [(1, "first set fails")])
    if isolation_level == "":
        conn.commit()
    assert _rows(connect, f"SELECT id, v FROM {table} ORDER BY id") == [
        (1, "a"), (2, "b"), (10, "x"), (11, "x")]


def test_connect_time_pragma_recipes_that_change_nothing(connect):
    """SQLAlchemy's and Django's connect-time recipes: asking for WAL, or for what raftsql pins
    (foreign keys OFF), works; anything else is refused loudly rather than ignored."""
    conn = connect(isolation_level=None)
    assert conn.execute("PRAGMA journal_mode=WAL").fetchall() == [("wal",)]
    assert conn.execute("PRAGMA journal_mode").fetchall() == [("wal",)]
    assert conn.execute("PRAGMA foreign_keys=OFF").fetchall() == []
    assert conn.execute("PRAGMA foreign_keys = 'false'").fetchall() == []
    assert conn.execute("PRAGMA foreign_keys").fetchall() == [(0,)]
    if connect.db is raftsql.driver:
        with pytest.raises(raftsql.driver.DatabaseError, match="does not enforce foreign keys"):
            conn.execute("PRAGMA foreign_keys=ON")
        with pytest.raises(raftsql.driver.DatabaseError, match="journal_mode"):
            conn.execute("PRAGMA journal_mode=DELETE")


def test_named_parameters_are_looked_up_one_by_one(connect, table):
    """As sqlite3: each parameter the statement names is looked up with params[name], so a
    mapping's __missing__ answers, and keys no parameter names are ignored whatever they hold."""

    class Defaults(dict):
        def __missing__(self, key):
            return f"missing:{key}"

    conn = connect(isolation_level=None)
    assert conn.execute("SELECT :a, :b", Defaults(a=1)).fetchone() == (1, "missing:b")
    assert conn.execute("SELECT :a, @a", {"a": 1, "unused": object()}).fetchone() == (1, 1)
    conn.execute(f"CREATE TABLE {table} (a, b)")
    conn.executemany(f"INSERT INTO {table} VALUES (:a, :b)",
                     [Defaults(a=1), {"a": 2, "b": 3, "junk": object()}])
    assert conn.execute(f"SELECT a, b FROM {table} ORDER BY a").fetchall() == [
        (1, "missing:b"), (2, 3)]
    with pytest.raises(connect.db.ProgrammingError, match="binding parameter :b"):
        conn.execute("SELECT :a, :b", {"a": 1})


def test_a_schema_change_shows_in_the_next_statements_columns(connect, table):
    """After ALTER TABLE (or DROP and CREATE) the same SELECT * names the new columns at once,
    and a transaction reading the changed table commits: a statement from the nodes' statement
    caches used to name the old schema's columns (so sqlite3.Row lost a key) and make the
    commit check fail without any other writer."""
    c = connect()
    c.row_factory = connect.db.Row
    c.execute(f"CREATE TABLE {table}(a)")
    for _ in range(3):
        with c:
            c.execute(f"INSERT INTO {table} VALUES (1)")
            c.execute(f"SELECT * FROM {table}").fetchall()
    c.execute(f"ALTER TABLE {table} ADD COLUMN b DEFAULT 'B'")
    for _ in range(3):
        assert [dict(r) for r in c.execute(f"SELECT * FROM {table} LIMIT 1")] == [{"a": 1, "b": "B"}]
    with c:
        c.execute(f"INSERT INTO {table} VALUES (2, 'two')")
        assert len(c.execute(f"SELECT * FROM {table}").fetchall()) == 4
    c.execute(f"DROP TABLE {table}")
    c.execute(f"CREATE TABLE {table}(x, y)")
    c.execute(f"INSERT INTO {table} VALUES ('X', 'Y')")
    c.commit()
    for _ in range(3):
        assert [dict(r) for r in c.execute(f"SELECT * FROM {table}")] == [{"x": "X", "y": "Y"}]


@pytest.mark.parametrize("bad", ["generator", "no adapter", "bindings"])
@pytest.mark.parametrize("level", [None, ""])
def test_executemany_keeps_the_sets_before_one_that_cannot_run(connect, table, bad, level):
    """A set that fails before it reaches SQLite (an iterator that raises, a value without an
    adapter, a wrong number of parameters): sqlite3 has run the sets before it, which stay (in
    the implicit transaction, in the default mode)."""
    c = connect(isolation_level=level)
    c.execute(f"CREATE TABLE {table}(a)")

    def sets():
        yield (1,)
        yield (2,)
        if bad == "generator":
            raise ValueError("the source failed")
        yield (object(),) if bad == "no adapter" else (3, 4)
        yield (5,)

    errors = {"generator": ValueError, "no adapter": connect.db.ProgrammingError,
              "bindings": connect.db.ProgrammingError}
    with pytest.raises(errors[bad]):
        c.executemany(f"INSERT INTO {table} VALUES (?)", sets())
    assert c.in_transaction is (level is not None)
    c.commit()
    assert _rows(connect, f"SELECT a FROM {table} ORDER BY a") == [(1,), (2,)]


def test_transaction_control_errors_carry_sqlites_code_and_executemany_keeps_lastrowid(connect, table):
    c = connect(isolation_level=None)
    c.execute(f"CREATE TABLE {table}(a)")
    cur = c.cursor()
    cur.execute(f"INSERT INTO {table} VALUES (1)")
    before = cur.lastrowid
    cur.executemany(f"INSERT INTO {table} VALUES (?)", [(2,), (3,)])
    assert cur.lastrowid == before
    for statement in ("COMMIT", "ROLLBACK", "RELEASE nowhere"):
        with pytest.raises(connect.db.OperationalError) as info:
            c.execute(statement)
        assert (info.value.sqlite_errorcode, info.value.sqlite_errorname) == (1, "SQLITE_ERROR")
    c.execute("BEGIN")
    with pytest.raises(connect.db.OperationalError) as info:
        c.execute("BEGIN")
    assert (info.value.sqlite_errorcode, info.value.sqlite_errorname) == (1, "SQLITE_ERROR")
    c.execute("ROLLBACK")
