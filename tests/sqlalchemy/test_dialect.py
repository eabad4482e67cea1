"""The raftsql:// SQLAlchemy dialect on a real 3-node cluster: URL forms and the entry point,
pooling and pool_pre_ping, isolation levels, savepoints, RETURNING, insertmanyvalues,
reflection, Unavailable as a disconnect and the resend of an OutcomeUnknown."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

sa = pytest.importorskip("sqlalchemy")

from sqlalchemy import (  # noqa: E402
    Column,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    exc,
    func,
    insert,
    inspect,
    select,
    text,
)

import raftsql.driver as db  # noqa: E402
from raftsql import sqla_dialect  # noqa: E402


@pytest.fixture
def table(engine):
    md = MetaData()
    t = Table("sa_" + uuid.uuid4().hex[:10], md,
              Column("id", Integer, primary_key=True), Column("name", String(40)))
    md.create_all(engine)
    return t


def _dsn_parts(cluster):
    d = db._connection.DSN.parse(cluster.dsn)
    return [f"{h}:{p}" for h, p in d.hosts], d.params["certs"]


# --------------------------------------------------------------------------- URLs


def test_url_forms_reach_the_same_cluster(sa_cluster):
    hosts, certs = _dsn_parts(sa_cluster)
    urls = [
        f"raftsql:///{','.join(hosts)}?certs={certs}",  # the hosts after a third slash
        f"raftsql://{hosts[0]}/?host={hosts[1]}&host={hosts[2]}&certs={certs}",  # host= (psycopg's)
        f"raftsql://{hosts[1]}/?certs={certs}&timeout=15&consistency=linearizable",  # one node
        f"sqlite+raftsql:///{','.join(hosts)}?certs={certs}",
        sqla_dialect.sqlalchemy_url(sa_cluster.dsn),  # from a driver DSN
    ]
    for url in urls:
        eng = create_engine(url)
        try:
            assert eng.dialect.name == "sqlite" and eng.dialect.driver == "raftsql"
            with eng.connect() as c:
                assert c.execute(text("select 1")).scalar() == 1
        finally:
            eng.dispose()


def test_url_options_reach_the_driver(sa_cluster):
    hosts, certs = _dsn_parts(sa_cluster)
    eng = create_engine(f"raftsql:///{','.join(hosts)}?certs={certs}&timeout=7.5"
                        "&consistency=stale&autocommit=true")
    try:
        raw = eng.raw_connection().driver_connection
        assert raw.timeout == 7.5 and raw.consistency == "stale" and raw.autocommit is True
        assert eng.dialect.get_isolation_level(raw) == "AUTOCOMMIT"
    finally:
        eng.dispose()
    with pytest.raises(exc.ArgumentError, match="unknown query parameter"):
        create_engine(f"raftsql:///{hosts[0]}?certs={certs}&bogus=1").connect()
    with pytest.raises(exc.ArgumentError, match="autocommit"):
        create_engine(f"raftsql:///{hosts[0]}?certs={certs}&autocommit=maybe").connect()


def test_the_entry_point_needs_no_import(sa_cluster):
    """pip install raftsql registers raftsql://: a fresh interpreter that imports only
    sqlalchemy finds the dialect."""
    hosts, certs = _dsn_parts(sa_cluster)
    code = (
        "import sys, sqlalchemy as sa\n"
        f"e = sa.create_engine({f'raftsql:///{chr(44).join(hosts)}?certs={certs}'!r})\n"
        "with e.connect() as c: print(c.execute(sa.text('select 40 + 2')).scalar())\n"
        "print('raftsql.sqla_dialect' in sys.modules, type(e.dialect).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["42", "True", "RaftSQLDialect"]


# --------------------------------------------------------------------------- features


def test_pool_and_pre_ping(sa_cluster):
    eng = create_engine(sqla_dialect.sqlalchemy_url(sa_cluster.dsn), pool_size=2, pool_pre_ping=True)
    try:
        assert type(eng.pool).__name__ == "QueuePool"
        with eng.connect() as c:
            first = c.connection.driver_connection
        with eng.connect() as c:
            assert c.connection.driver_connection is first  # pooled, pinged
        first.close()  # the pooled connection dies: pre_ping notices and reconnects
        with eng.connect() as c:
            assert c.connection.driver_connection is not first
            assert c.execute(text("select 2")).scalar() == 2
    finally:
        eng.dispose()


def test_isolation_levels(engine, table):
    with engine.connect() as c:
        assert c.get_isolation_level() == "SERIALIZABLE"
        assert engine.dialect.get_isolation_level_values(None) == [
            "SERIALIZABLE", "READ UNCOMMITTED", "AUTOCOMMIT"]
    auto = engine.execution_options(isolation_level="AUTOCOMMIT")
    with auto.connect() as c:
        assert c.get_isolation_level() == "AUTOCOMMIT"
        assert c.connection.driver_connection.autocommit is True
        c.execute(insert(table).values(name="auto"))  # no commit: applied at once
    with engine.connect() as c:
        assert c.get_isolation_level() == "SERIALIZABLE"  # reset when it went back to the pool
        assert c.execute(select(table.c.name)).scalars().all() == ["auto"]
        c.execute(insert(table).values(name="rolled back"))
        c.rollback()
        assert c.execute(select(func.count()).select_from(table)).scalar() == 1
    with pytest.raises(exc.ArgumentError):
        engine.execution_options(isolation_level="REPEATABLE READ").connect().close()


def test_savepoints_begin_nested(engine, table):
    with engine.connect() as c:
        with c.begin():
            c.execute(insert(table).values(name="outer"))
            with c.begin_nested() as sp:
                c.execute(insert(table).values(name="rolled back to savepoint"))
                sp.rollback()
            with c.begin_nested():
                c.execute(insert(table).values(name="released"))
        assert sorted(c.execute(select(table.c.name)).scalars()) == ["outer", "released"]
        c.rollback()  # ends the autobegun transaction of that SELECT
        # A SAVEPOINT as the first statement nests in the transaction: RELEASE does not commit.
        with c.begin() as outer:
            with c.begin_nested():
                c.execute(insert(table).values(name="gone"))
            outer.rollback()
        assert sorted(c.execute(select(table.c.name)).scalars()) == ["outer", "released"]


def test_returning_and_insertmanyvalues(engine, table):
    with engine.begin() as c:
        r = c.execute(insert(table).values(name="a").returning(table.c.id, table.c.name))
        assert r.one()[1] == "a"
        rows = c.execute(insert(table).returning(table.c.name, sort_by_parameter_order=True),
                         [{"name": f"n{i}"} for i in range(50)]).scalars().all()
        assert rows == [f"n{i}" for i in range(50)]
    statements = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with engine.begin() as c:
        c.execute(insert(table).returning(table.c.id), [{"name": f"m{i}"} for i in range(10)])
    assert len(statements) == 1  # one INSERT ... VALUES (...), (...) RETURNING for 10 rows
    with engine.connect() as c:
        assert c.execute(select(func.count()).select_from(table)).scalar() == 61


def test_reflection(engine, table):
    insp = inspect(engine)
    cols = insp.get_columns(table.name)
    assert [(col["name"], str(col["type"]), col["primary_key"]) for col in cols] == [
        ("id", "INTEGER", 1), ("name", "VARCHAR(40)", 0)]
    assert table.name in insp.get_table_names()
    assert insp.get_schema_names() == ["main"]
    reflected = Table(table.name, MetaData(), autoload_with=engine)
    assert [c.name for c in reflected.columns] == ["id", "name"]


# --------------------------------------------------------------------------- failures


def test_unavailable_is_a_disconnect(sa_cluster):
    """A node that cannot be reached: Unavailable, which SQLAlchemy treats as a disconnect
    (the pooled connection is invalidated)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once the socket closes
    client = _dsn_parts(sa_cluster)[1]
    eng = create_engine(f"raftsql:///127.0.0.1:{port}?certs={client}&timeout=0.5")
    try:
        with pytest.raises(exc.OperationalError) as info:
            with eng.connect() as c:
                c.execute(text("select 1"))
        assert isinstance(info.value.orig, db.Unavailable)
        assert info.value.connection_invalidated
    finally:
        eng.dispose()
    assert eng.dialect.is_disconnect(db.Unavailable("x"), None, None)
    assert not eng.dialect.is_disconnect(db.OutcomeUnknown("x", serial=1, statements=[],
                                                           client_id="c"), None, None)
    assert not eng.dialect.is_disconnect(db.SerializationError("x"), None, None)


def test_outcome_unknown_is_resent_at_most_once(engine, table, monkeypatch):
    """The SQLAlchemy-level recipe for OutcomeUnknown: catch it, resend() on the same
    connection; the write is applied once even though its first attempt was applied."""
    from raftsql.driver import _client

    with engine.connect() as c:
        raw = c.connection.driver_connection
        real = raw._client.execute

        def applied_then_lost(statements, **kw):
            real(statements, **kw)  # the write reaches the log...
            raise _client.OutcomeUnknown("connection lost after sending", kw["serial"])  # ...the answer does not

        monkeypatch.setattr(raw._client, "execute", applied_then_lost)
        try:
            with pytest.raises(exc.OperationalError) as info:
                with c.begin():
                    c.execute(insert(table).values(name="once"))
        finally:
            monkeypatch.setattr(raw._client, "execute", real)
        assert isinstance(info.value.orig, db.OutcomeUnknown)
        cur = sqla_dialect.resend(c, info.value)
        assert cur._result["duplicate"] is True  # it had been applied: the stored result
        assert c.execute(select(table.c.name)).scalars().all() == ["once"]
