"""executemany as one "many" statement (command version 3; server/DESIGN.md, "Many
statements"): the first parameter set runs as an ordinary statement with all its checks, the
rest through apsw's executemany from the statement cache, untraced when that is exactly
equivalent. A mixin of StateMachine: it runs on the apply connection, under the apply lock,
with the same apply context."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import apsw

from raftsql.command import Many
from raftsql.protocol import BINDINGS, Result
from raftsql.server.sandbox import SCHEMA
from raftsql.server.sqlerrors import NodeProblem, StatementFailed, max_rowid_error

if TYPE_CHECKING:
    from raftsql.server.statemachine import ApplyContext

_SQL_PLAIN_WRITES = (
    "SELECT 1 FROM sqlite_schema WHERE type='trigger' AND lower(tbl_name)=?1 "
    "UNION ALL SELECT 1 FROM pragma_foreign_key_list(?1) "
    "WHERE lower(\"table\")=?1 AND (on_delete NOT IN ('NO ACTION', 'RESTRICT') "
    "OR on_update NOT IN ('NO ACTION', 'RESTRICT')) "
    "UNION ALL SELECT 1 FROM sqlite_schema WHERE type='table' AND lower(name)=?1 "
    "AND sql LIKE 'CREATE VIRTUAL%' LIMIT 1"
)


class ManyStatements:
    """The executemany path of StateMachine (see the module docstring)."""

    _ctx: ApplyContext

    def _run_many(self, sql: str, many: Many) -> Result:
        """A "many" statement: the first parameter set runs as a normal statement (all of its
        checks: one statement, not VACUUM, ...), the rest through executemany, prepared once.
        rowcount is the sum of the changes (as sqlite3's executemany); rows are discarded."""
        sets = many.sets
        entry_writes = self._guard.writes
        mine: set[str] = set()
        self._guard.writes = mine  # the tables this statement may write (triggers included)
        try:
            first = self._run_statement(sql, sets[0])
        except (StatementFailed, NodeProblem) as failed:
            failed.error["set"] = 0
            raise
        finally:
            if entry_writes is not None:
                entry_writes |= mine
            self._guard.writes = entry_writes
        if len(sets) == 1:
            first.rows, first.columns, first.decltypes = [], [], []
            return first
        conn = self._conn
        self._ctx.many_total = first.rowcount if self._ctx.dml else -1
        if self._ctx.dml and self._plain_writes(mine):
            rng_state = self._rand.rng.getstate() if self._rand.rng is not None else None
            total = self._run_many_untraced(sql, sets)
            if total is not None:
                if self._guard.sequence_written:
                    self._check_sequences()
                return Result(rowcount=self._ctx.many_total + total, lastrowid=conn.last_insert_rowid())
            self._rand.rng = None  # redo with the tracer: the same random() values as the fast run
            if rng_state is not None:
                self._rand.rng = random.Random()
                self._rand.rng.setstate(rng_state)
        self._guard.denied = None
        self._guard.user_prepare = True
        self._ctx.many_set = 0
        try:
            for _ in self._many_cursor.executemany(self._fresh_text(sql), sets[1:]):
                pass
            if self._ctx.dml:
                self._ctx.many_total += conn.changes()
        except Exception as e:  # noqa: BLE001 - mapped to a result or re-raised as fatal
            if not isinstance(e, apsw.Error):  # still open (see _run_statement)
                self._many_cursor = self._fresh_cursor(self._many_cursor, self._trace_many)
            try:
                error = self._statement_error(e)
            except NodeProblem as problem:
                problem.error["set"] = self._ctx.many_set
                raise
            # apsw binds a set before its exec trace runs: a set whose parameters do not bind
            # fails untraced, so it is the one after the last traced.
            error["set"] = self._ctx.many_set + (error.get("name") == BINDINGS)
            raise StatementFailed(error, by_sqlite=self._by_sqlite(e)) from None
        finally:
            self._ctx.budget_on = False
        if self._ctx.max_rowid_table is not None:
            error = max_rowid_error(self._ctx.max_rowid_table)
            error["set"] = self._ctx.many_set
            raise StatementFailed(error)
        if self._guard.sequence_written:
            self._check_sequences()
        return Result(rowcount=self._ctx.many_total, lastrowid=conn.last_insert_rowid())

    def _fresh_text(self, sql: str) -> str:
        """sql behind a comment no earlier text had: apsw prepares it once, afresh, and runs
        every set on that statement. A statement from apsw's cache keeps its VM step counter
        from earlier runs, which made the step limit depend on a node's history (see
        StateMachine._run_statement); without the cache (can_cache=False) apsw prepared the
        statement again for every set, which halved executemany's rows/s."""
        self._many_texts += 1
        return f"/* raftsql {self._many_texts} */ {sql}"

    def _plain_writes(self, tables: set[str]) -> bool:
        """True if every change a statement writing `tables` makes is one of its own rows: one
        table (a trigger or a foreign key action on another table would add it), with no
        trigger and no self-referencing foreign key action, not a virtual table (FTS5 writes
        its shadow tables: 3 rows counted 7 once its statements were cached, so a warm node
        and a cold one stored different rowcounts). Then total_changes() grows by exactly
        what changes() reports per run (REPLACE deletions count in neither)."""
        if len(tables) != 1:
            return False
        (name,) = tables
        if name == SCHEMA:
            return False
        return not self._internal(_SQL_PLAIN_WRITES, (name,))

    def _run_many_untraced(self, sql: str, sets: tuple) -> int | None:
        """The fast path of a many statement (no exec tracer: about a quarter of its cost):
        sets[1:] in a savepoint, with one step budget for them all. Returns the summed
        changes, or None after rolling the savepoint back when anything went wrong (an
        error, the largest rowid): the caller then redoes them with the tracer, which stops
        at the right set and names it, identically on every node."""
        conn = self._conn
        guard = self._guard
        self._internal("SAVEPOINT raftsql_many")
        before = conn.total_changes()
        limit = self._ctx.max_progress_calls
        guard.denied = None
        # The same text as the first set's, which passed the strict rules and gave the write
        # set: this prepare (afresh, see _run_statement) is not tracked again.
        guard.user_prepare = False
        self._ctx.max_progress_calls = limit * (len(sets) - 1)
        self._ctx.new_budget()
        self._ctx.budget_on = True
        failed = False
        try:
            for _ in self._fast_cursor.executemany(self._fresh_text(sql), sets[1:]):
                pass
        except Exception as e:  # noqa: BLE001 - any failure: redo traced, which maps the error
            if not isinstance(e, apsw.Error):  # still open (see _run_statement)
                self._fast_cursor = self._fresh_cursor(self._fast_cursor)
            if not conn.in_transaction:
                # OR ROLLBACK, or the step limit (an interrupt): the entry's transaction is
                # gone, so no redo; the batch is redone with this error (_TransactionLost).
                raise StatementFailed(self._statement_error(e), by_sqlite=self._by_sqlite(e)) from None
            failed = True
        finally:
            self._ctx.budget_on = False
            self._ctx.max_progress_calls = limit
        if not failed and self._ctx.max_rowid_table is None:
            self._internal("RELEASE raftsql_many")
            return conn.total_changes() - before
        self._ctx.max_rowid_table = None
        self._ctx.step_limit_hit = False
        self._internal("ROLLBACK TO raftsql_many")
        self._internal("RELEASE raftsql_many")
        return None

    def _trace_many(self, cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
        """Exec tracer of the executemany cursor: once per parameter set after the first."""
        if self._ctx.max_rowid_table is not None:
            # The previous set stored the largest rowid: stop before a later set makes SQLite
            # pick a rowid with its own PRNG (the error names that previous set).
            self._ctx.abort = max_rowid_error(self._ctx.max_rowid_table)
            return False
        self._ctx.many_set += 1
        if self._ctx.many_set > 1 and self._ctx.dml:
            self._ctx.many_total += self._conn.changes()  # of the previous set
        self._guard.user_prepare = False
        self._ctx.new_budget()
        self._ctx.budget_on = True
        return True
