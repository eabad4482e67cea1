"""The standard DB-API 2.0 compliance suite (dbapi20.py from the dbapi-compliance package)
against a real 3-node cluster: with sqlite3's legacy transaction control (the default), with
autocommit=False and with autocommit=True.

One deliberate difference from PEP 249, taken from sqlite3: fetchone()/fetchmany()/fetchall()
on a cursor with no result set return None / [] / [] instead of raising (sqlite3 code relies on
it). dbapi20's fetch tests run whole, with those three assertions turned into sqlite3's."""

from __future__ import annotations

import unittest

import dbapi20
import pytest

import raftsql.driver


@pytest.fixture(scope="class")
def dbapi_cluster(request, cluster):
    request.cls.connect_args = (cluster.dsn,)


class _Base(dbapi20.DatabaseAPI20Test):
    __test__ = False  # only the subclasses below run
    driver = raftsql.driver
    connect_args = ()  # set by the dbapi_cluster fixture
    connect_kw_args = {"timeout": 20}

    def _drop_tables(self) -> None:
        con = self.driver.connect(*self.connect_args, timeout=20, autocommit=True)
        try:
            for ddl in (self.xddl1, self.xddl2):
                con.execute(ddl.replace("drop table", "drop table if exists"))
        finally:
            con.close()

    def setUp(self):
        super().setUp()
        self._drop_tables()

    def tearDown(self):
        self._drop_tables()
        super().tearDown()

    # --- tests that do not apply, each with its reason

    @unittest.skip("no stored procedures: like sqlite3, the Cursor has no callproc()")
    def test_callproc(self):
        pass

    @unittest.skip("no stored procedures or multiple result sets: like sqlite3, no nextset()")
    def test_nextset(self):
        pass

    @unittest.skip("setoutputsize() is a no-op as in sqlite3 (values come back whole); "
                   "test_setoutputsize_basic checks the call")
    def test_setoutputsize(self):
        pass

    @unittest.skip("close() is idempotent, as in sqlite3 and psycopg; every other use of a closed "
                   "connection raises ProgrammingError (test_close)")
    def test_non_idempotent_close(self):
        pass

    # --- fetch*() without a result set: sqlite3's answer instead of PEP 249's error

    def _as_sqlite3(self, test) -> None:
        """Run one of dbapi20's fetch tests, where its `assertRaises(Error, cur.fetchX)` (no
        result set) checks sqlite3's answer instead: None for fetchone, [] for the others."""
        plain = self.assertRaises

        def check(exc, fn, *args, **kw):
            name = getattr(fn, "__name__", "")
            if exc is self.driver.Error and name in ("fetchone", "fetchmany", "fetchall"):
                self.assertEqual(fn(*args, **kw), None if name == "fetchone" else [])
                return None
            return plain(exc, fn, *args, **kw)

        self.assertRaises = check
        try:
            test()
        finally:
            del self.assertRaises

    def test_fetchone(self):
        self._as_sqlite3(super().test_fetchone)

    def test_fetchmany(self):
        self._as_sqlite3(super().test_fetchmany)

    def test_fetchall(self):
        self._as_sqlite3(super().test_fetchall)


@pytest.mark.usefixtures("dbapi_cluster")
class TestDBAPI20Legacy(_Base):
    __test__ = True
    connect_kw_args = {"timeout": 20}


@pytest.mark.usefixtures("dbapi_cluster")
class TestDBAPI20Transactions(_Base):
    __test__ = True
    connect_kw_args = {"timeout": 20, "autocommit": False}


@pytest.mark.usefixtures("dbapi_cluster")
class TestDBAPI20Autocommit(_Base):
    __test__ = True
    connect_kw_args = {"timeout": 20, "autocommit": True}
