"""The read side of the state machine: a pool of read-only SQLite connections that serve reads
(whole, or streamed in chunks by a ReadCursor) and check statements before they are proposed
(validate), concurrently with apply (WAL). See server/DESIGN.md, "Reads" and "Validation before
proposing"."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import apsw
import msgpack

from raftsql.command import Many
from raftsql.protocol import (
    BINDINGS,
    MULTIPLE_STATEMENTS,
    NOT_READONLY,
    RESULT_TOO_BIG,
    TIMEOUT,
    Result,
    sql_error,
)
from raftsql.server.sandbox import PROGRESS_STEPS, Guard, configure, prepare_bounded
from raftsql.server.sqlerrors import (
    MAX_RESULT_BYTES,
    SQLITE_AUTH,
    SQLITE_ERROR,
    SQLITE_INTERRUPT,
    SQLITE_READONLY,
    SQLITE_TOOBIG,
    SQLError,
    classify,
    code_name,
    common_error,
    read_too_big_error,
    value_size,
)
from raftsql.server.transactions import modified_after
from raftsql.sqltext import MAX_CACHED_SQL, first_keyword, skip_blank

if TYPE_CHECKING:
    from raftsql.server.statemachine import StateMachine

log = __import__("logging").getLogger("raftsql.server.statemachine")


@dataclass
class Reader:
    conn: apsw.Connection
    guard: Guard
    deadline: float = 0.0
    active: bool = False
    timed_out: bool = False
    traced: int = 0
    description: tuple = ()
    abort: dict[str, Any] | None = None
    statement: str = ""
    # (text, schema cookie) -> the result columns of that text's fresh prepare under that
    # schema. A statement from apsw's cache that the schema changed under is re-prepared by
    # SQLite only when it steps, after the exec trace, where apsw would still name the old
    # schema's columns (and keep naming them for that run): a cached run takes them from here.
    descriptions: dict[tuple[str, int], tuple] = field(default_factory=dict)
    known: tuple | None = None  # the description of the statement being started, if known


# Statements whose volatility Reads remembers (past it the memory starts afresh).
_VOLATILE_MEMO = 4096


_SQL_SESSION_RESULT = "SELECT result FROM sqlite_raftsql_sessions WHERE client_id=?"
# Inside the read transaction: the index it reads at, and the schema it runs under.
_SQL_READ_STATE = ("SELECT applied_index, (SELECT schema_version FROM pragma_schema_version) "
                   "FROM sqlite_raftsql_meta")
_MAX_DESCRIPTIONS = 512  # per reader connection; past it the memory starts afresh


def heap_limit_error(e: BaseException) -> dict[str, Any] | None:
    """A read's out-of-memory error under the node's heap limit, saying so (None otherwise)."""
    if classify(e) != "memory" or not (limit := apsw.hard_heap_limit(-1)):
        return None
    return sql_error(apsw.SQLITE_NOMEM, "SQLITE_NOMEM", (
        f"out of memory: the statement needs more than the node's SQLite heap limit "
        f"({limit} bytes, sqlite_heap_limit) allows, with what else the node holds"))


def stored_rowid(stored: bytes) -> int:
    """lastrowid of a session row's stored result (Result.encode; 0 if none, or an error's),
    without building the Result. Every write of a client reads its previous one's: a big
    result (RETURNING rows) is walked key by key, its rows skipped unbuilt."""
    try:
        if len(stored) <= _SMALL_RESULT:
            value = msgpack.unpackb(stored, raw=False).get("lastrowid")
        else:
            unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(stored))
            unpacker.feed(stored)
            value = None
            for _ in range(unpacker.read_map_header()):
                if unpacker.unpack() == "lastrowid":
                    value = unpacker.unpack()
                    break
                unpacker.skip()
    except (ValueError, TypeError, AttributeError, msgpack.UnpackException):
        return 0
    return value if type(value) is int else 0


_SMALL_RESULT = 4096  # bytes: decoded whole (about 1 µs), larger ones walked

class ReadCursor:
    """One read in progress on a reader connection: its rows, streamed in chunks from one
    SQLite read transaction (the snapshot at the Result's index), so neither the node nor the
    client ever holds a large result whole. Not thread-safe: one request at a time uses it
    (the client connection that owns it). close() ends the read transaction and returns the
    reader to the pool; a cursor left open holds back WAL checkpoints, so the client service
    closes idle ones."""

    def __init__(self, reads: Reads, reader: Reader, max_row_bytes: int | None):
        self._reads = reads
        self._reader = reader
        self._max_row_bytes = max_row_bytes
        self._rows: Any = None  # the apsw cursor, an iterator of rows
        self._sent = 0  # rows handed out so far
        self._consumed = 0  # rows taken from the SQLite statement so far
        self.bad_text: list[list[int]] = []
        self._sql = ""
        self._params: Any = ()
        self._wrapped = False  # restarted with invalid UTF-8 text made visible (see _recover)
        self.index = 0
        self.error: dict[str, Any] | None = None
        self.closed = False
        self.last_used = time.monotonic()

    def start(self, sql: str, params: Any, read_set: set[str] | None,
              start_index: int | None, client_id: str | None = None) -> Result:
        reader, reads = self._reader, self._reads
        conn, guard, tag = reader.conn, reader.guard, reads.tag
        reader.traced = 0
        reader.description = ()
        reader.abort = None
        reader.timed_out = False
        reader.deadline = time.monotonic() + reads.query_timeout_s
        guard.denied = None
        guard.internal = True
        try:
            conn.execute(tag + "BEGIN")
            self.index, cookie = conn.execute(tag + _SQL_READ_STATE).fetchone()
            # last_insert_rowid() is the client's, as its next write would start from
            # (StateMachine._apply_command), never another client's from an earlier read.
            rowid = 0
            if client_id and "last_insert_rowid" in sql.lower():
                rows = conn.execute(tag + _SQL_SESSION_RESULT, (client_id,)).fetchall()
                rowid = stored_rowid(rows[0][0]) if rows else 0
            conn.set_last_insert_rowid(rowid)
        finally:
            guard.internal = False
        guard.reads = read_set
        guard.prepared = guard.volatile = False
        self._sql, self._params = sql, params if params is not None else ()
        key = (sql, cookie)
        remember = len(sql) <= MAX_CACHED_SQL  # a longer text is always prepared afresh
        reader.known = known = reader.descriptions.get(key) if remember else None
        try:
            # Collecting a read set needs the authorizer, which runs only at prepare; a text
            # whose columns under this schema are not known yet is prepared afresh, which
            # tells them.
            self._rows = prepare_bounded(conn, guard, sql, lambda: conn.cursor().execute(
                sql, self._params, can_cache=read_set is None and known is not None))
            if known is None and reader.traced and remember:
                if len(reader.descriptions) >= _MAX_DESCRIPTIONS:
                    reader.descriptions.clear()
                reader.descriptions[key] = reader.description
            if start_index is not None and read_set:
                conflict = modified_after(conn, guard, tag, read_set, start_index)
                if conflict is not None:
                    return Result(index=self.index, error=conflict)
        except Exception as e:  # noqa: BLE001 - a read's failure is always just its result
            if isinstance(e, UnicodeDecodeError) and self._recover():
                pass
            else:
                return Result(index=self.index, error=reads.read_error(reader, e))
        finally:
            guard.reads = None
            reader.active = False
            reader.known = None
        if guard.prepared:
            reads.note_volatile(sql, guard.volatile)
            volatile = guard.volatile
        else:
            volatile = reads.was_volatile(sql)
        desc = reader.description
        return Result(
            columns=[d[0] for d in desc],
            decltypes=[d[1] for d in desc],
            rowcount=-1,
            lastrowid=None,
            index=self.index,
            volatile=volatile,
        )

    def fetch(self, max_bytes: int) -> tuple[list[list[Any]] | None, bool]:
        """The next rows, about max_bytes of them (at least one), and whether the read is
        done. (None, True) if it failed: the error is in .error. Text that is not valid UTF-8
        comes as bytes, with its (row, column) position listed in .bad_text (relative to
        this chunk)."""
        self.last_used = time.monotonic()
        self.bad_text: list[list[int]] = []
        reader, reads = self._reader, self._reads
        out: list[list[Any]] = []
        size = 0
        reader.deadline = time.monotonic() + reads.query_timeout_s
        reader.timed_out = False
        reader.active = True
        try:
            while True:
                if out and size >= max_bytes:
                    # Stop before reading another row: a chunk ends with the row that filled
                    # it, so at most one large row is held (never one read ahead).
                    self._sent += len(out)
                    return out, False
                got = self._next_row()
                if got is None:
                    return out, True
                row, bad = got
                n = sum(map(value_size, row)) + 5
                if self._max_row_bytes is not None and n > self._max_row_bytes:
                    self.error = sql_error(
                        SQLITE_TOOBIG,
                        RESULT_TOO_BIG,
                        f"row {self._sent + len(out) + 1} of the result is about {n} bytes, "
                        f"more than one frame can carry ({self._max_row_bytes} bytes, the "
                        "node's max_frame_size); read its large values in pieces, e.g. with "
                        "substr(value, start, length)",
                    )
                    return None, True
                for c in bad:
                    self.bad_text.append([len(out), c])
                out.append(row)
                size += n
        except Exception as e:  # noqa: BLE001 - a read's failure is always just its result
            self.error = reads.read_error(reader, e)
            return None, True
        finally:
            reader.active = False

    def _next_row(self) -> tuple[list[Any], list[int]] | None:
        """The next row and the columns whose TEXT is not valid UTF-8 (sent as bytes)."""
        while True:
            try:
                row = next(self._rows, None)
                if row is not None:
                    self._consumed += 1
            except UnicodeDecodeError:
                if self._wrapped or not self._recover():
                    raise
                continue
            if row is None:
                return None
            if not self._wrapped:
                return list(row), []
            # Wrapped: (typeof, value) per column; text that does not decode stays bytes.
            out, bad = [], []
            for c in range(0, len(row), 2):
                value = row[c + 1]
                if row[c] == "text":
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError:
                        bad.append(c // 2)
                out.append(value)
            return out, bad

    def _recover(self) -> bool:
        """A TEXT value that is not valid UTF-8 stopped the read (apsw cannot hand over its
        bytes). Run the statement again in the same read transaction, wrapped so that every
        TEXT value arrives as bytes with its type, and skip the rows already read: the client
        then decides, as sqlite3's text_factory does. Only a SELECT, VALUES or WITH statement
        can be wrapped; False otherwise (the read fails with sqlite3's decode error)."""
        reader = self._reader
        sql = reader.statement or self._sql
        if first_keyword(sql) not in ("SELECT", "VALUES", "WITH") or not reader.description:
            return False
        cols = len(reader.description)
        names = ", ".join(f"c{i}" for i in range(cols))
        picks = ", ".join(
            f"typeof(c{i}), CASE WHEN typeof(c{i}) = 'text' THEN CAST(c{i} AS BLOB) ELSE c{i} END"
            for i in range(cols)
        )
        wrapped = (
            f"WITH raftsql_text_q({names}) AS (\n{sql.rstrip().rstrip(';')}\n) "
            f"SELECT {picks} FROM raftsql_text_q"
        )
        description = reader.description
        reader.traced = 0
        try:
            rows = prepare_bounded(reader.conn, reader.guard, wrapped, lambda: reader.conn.cursor().execute(
                wrapped, self._params, can_cache=False))
        except Exception:  # noqa: BLE001 - cannot wrap it: the plain decode error stands
            return False
        finally:
            reader.description = description
            reader.traced = 0
        skip = self._consumed
        for _ in range(skip):
            if next(rows, None) is None:
                break
        self._rows = rows
        self._wrapped = True
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        reader, reads = self._reader, self._reads
        reader.active = False
        guard = reader.guard
        guard.internal = True
        try:
            self._rows = None
            if reader.conn.in_transaction:
                reader.conn.execute(reads.tag + "COMMIT")
        except apsw.Error as e:  # a reader that cannot end its read: drop it
            log.warning("closing a read cursor failed: %s", e)
            reader.conn.close()
            return
        finally:
            guard.internal = False
        reads.checkin(reader)


class Reads:
    """The read connections of one StateMachine. query/open_query/validate may run from any
    thread; each read holds one connection from the pool for its duration."""

    def __init__(self, sm: StateMachine, tag: str, query_timeout_s: float):
        self._sm = sm
        self.path = sm.path
        self.tag = tag  # the state machine's secret tag for internal statements
        self.query_timeout_s = query_timeout_s
        # Idle connections by rule set: reads' (False) and the write-path checks' (True). Each
        # check takes its own, so one slow prepare (a statement that costs SQLite seconds to
        # compile) holds up no other write.
        self._pools: dict[bool, list[Reader]] = {False: [], True: []}
        self._pool_lock = threading.Lock()
        self.closed = False
        # SQL text -> whether its last prepare (on any reader) called a volatile function
        # (txncheck.VOLATILE_FUNCTIONS): a statement from apsw's cache runs no authorizer.
        self._volatile: dict[str, bool] = {}

    def note_volatile(self, sql: str, volatile: bool) -> None:
        if len(sql) > MAX_CACHED_SQL:
            return  # not remembered (was_volatile: True), as memories keyed by text are bounded
        if len(self._volatile) >= _VOLATILE_MEMO and sql not in self._volatile:
            self._volatile.clear()
        self._volatile[sql] = volatile

    def was_volatile(self, sql: str) -> bool:
        """For a statement that came from the cache: its last prepare's answer (True if none
        is remembered: rerunning a read as a preview is only slower)."""
        return self._volatile.get(sql, True)

    def validate(self, statements: Sequence[tuple[str, Any]],
                 returns_rows: list[bool] | None = None) -> list[bool]:
        """Prepare each (sql, params) without running it and return its read-only flag.
        returns_rows: if given, gets one flag per statement: does it return rows (a SELECT,
        RETURNING)?

        Raises SQLError for what apply would refuse or fail to compile: syntax errors, unknown
        tables (unless an earlier statement of the batch changes the schema: then the check is
        left to apply), sandbox refusals, wrong bindings, several statements in one string."""
        self._sm._check_open()
        flags: list[bool] = []
        reader = self.checkout(write_rules=True)
        try:
            reader.guard.schema_change = False
            # Preparing never checks the schema cookie, so this connection could still hold the
            # schema from before a CREATE TRIGGER (and call "DROP TRIGGER IF EXISTS" a no-op,
            # read-only). Reading a table does check it, and reloads the schema if it moved.
            reader.guard.internal = True
            try:
                reader.conn.execute(self.tag + "SELECT applied_index FROM sqlite_raftsql_meta").fetchall()
            finally:
                reader.guard.internal = False
            # An executemany batch repeats one statement with new values: preparing and binding
            # depend only on the text and the parameters' shape, so check each shape once.
            seen: dict[tuple, tuple[bool, bool]] = {}
            for i, item in enumerate(statements):
                if isinstance(item, str):
                    sql, params = item, ()
                else:
                    sql, params = item
                flag = True
                rows = False
                if type(params) is not Many:
                    group: Sequence[Any] = (params,)
                elif set(map(type, params.sets)) == {tuple}:
                    # One set per distinct length (C speed for 1,000 sets of one shape).
                    group = list({len(one): one for one in params.sets}.values())
                else:
                    group = params.sets
                for k, one in enumerate(group):
                    if isinstance(one, dict):
                        shape: Any = tuple(sorted(one))
                    else:
                        shape = len(one) if one is not None else 0
                    key = (sql, shape)
                    if key not in seen:
                        try:
                            seen[key] = self._prepare_only(reader, sql, one)
                        except SQLError as e:
                            if k > 0 and e.name == BINDINGS:
                                # A later set of an executemany with the wrong parameters:
                                # apply fails at that set and keeps the ones before it, as
                                # sqlite3 does (refusing the request would keep none).
                                continue
                            e.statement = i
                            raise
                    flag = flag and seen[key][0]
                    rows = rows or seen[key][1]
                flags.append(flag)
                if returns_rows is not None:
                    returns_rows.append(rows)
        finally:
            self.checkin(reader)
        return flags

    def stored_result(self, client_id: str, serial: int) -> Result | None:
        """The result stored for (client_id, serial) if this node has applied that write, else
        None. A resent write can fail to prepare only because its first attempt was applied
        (CREATE TABLE: "already exists"); the stored result is then its answer."""
        self._sm._check_open()
        reader = self.checkout(write_rules=True)
        reader.guard.internal = True
        try:
            rows = reader.conn.execute(
                self.tag + "SELECT serial, result FROM sqlite_raftsql_sessions WHERE client_id=?",
                (client_id,)).fetchall()
        finally:
            reader.guard.internal = False
            self.checkin(reader)
        if not rows or rows[0][0] != serial:
            return None
        result = Result.decode(rows[0][1])
        result.duplicate = True
        return result

    def _prepare_only(self, reader: Reader, sql: str, params: Any) -> tuple[bool, bool]:
        """(read-only, returns rows) of one statement, prepared and bound, never stepped."""
        seen: dict[str, Any] = {}

        def tracer(cursor: apsw.Cursor, first: str, bindings: Any) -> bool:
            if not cursor.has_vdbe:
                return True
            guard.selects_left = None
            seen["sql"] = first
            seen["readonly"] = cursor.is_readonly
            seen["rows"] = bool(cursor.description)
            return False  # abort: prepared and bound, never stepped

        guard = reader.guard
        schema_changed_before = guard.schema_change
        guard.denied = None
        cursor = reader.conn.cursor()
        cursor.exec_trace = tracer
        try:
            prepare_bounded(reader.conn, guard, sql, lambda: cursor.execute(
                sql, params if params is not None else (), can_cache=False))
        except apsw.ExecTraceAbort:
            pass
        except Exception as e:  # noqa: BLE001 - every failure becomes an SQLError or passes
            err = common_error(e, guard) or heap_limit_error(e) or sql_error(
                getattr(e, "extendedresult", None) or SQLITE_ERROR,
                apsw.mapping_result_codes.get(getattr(e, "result", None), "SQLITE_ERROR"),
                str(e.args[0]) if e.args else str(e),
            )
            msg = err["message"]
            if (
                schema_changed_before
                and err["name"] == "SQLITE_ERROR"
                and "syntax error" not in msg
                and "incomplete input" not in msg
                and "unrecognized token" not in msg
            ):
                # e.g. INSERT into a table created earlier in this batch: apply decides.
                return False, True
            raise SQLError(err["code"], err["name"], msg) from None
        if "sql" not in seen:
            return True, False  # only comments: a no-op
        first = seen["sql"]
        # The first statement's text is normally a prefix of sql; if blank pieces came first,
        # find where it ends.
        end = len(first) if sql.startswith(first) else sql.find(first) + len(first)
        if skip_blank(sql, end) < len(sql):
            raise SQLError(
                SQLITE_ERROR, MULTIPLE_STATEMENTS, "You can only execute one statement at a time."
            )
        if not seen["readonly"] and first_keyword(sql) == "VACUUM":
            raise SQLError(SQLITE_AUTH, "SQLITE_AUTH", "not authorized: VACUUM is not allowed")
        return bool(seen["readonly"]), seen["rows"]

    def query(
        self,
        sql: str,
        params: Any = (),
        *,
        at_index: int | None = None,
        reads: set[str] | None = None,
        start_index: int | None = None,
        max_bytes: int = MAX_RESULT_BYTES,
        client_id: str | None = None,
    ) -> Result:
        """Run one read-only statement on a read connection (WAL: concurrent with apply) and
        return all of its rows, at most max_bytes of them (else the error RAFTSQL_RESULT_TOO_BIG:
        larger results are read with open_query()).

        at_index: wait (up to query_timeout_s) until that index is applied. Result.index is the
        applied index of the snapshot the read saw. Errors are returned in Result.error, never
        raised. 'now' and random() here come from this node's clock and PRNG (not replicated).

        reads / start_index: as for preview() (a transaction's read served by a reader)."""
        result, cursor = self.open_query(
            sql, params, at_index=at_index, reads=reads, start_index=start_index,
            first_bytes=max_bytes, max_row_bytes=max_bytes, client_id=client_id,
        )
        if result.error is not None and result.error["name"] == RESULT_TOO_BIG:
            result.error = read_too_big_error(max_bytes)
        if cursor is not None:
            cursor.close()
            return Result(index=result.index, error=read_too_big_error(max_bytes))
        return result

    def stream_query(
        self,
        sql: str,
        params: Any = (),
        *,
        reads: set[str] | None = None,
        start_index: int | None = None,
        first_bytes: int = 1 << 20,
        max_row_bytes: int | None = None,
        client_id: str | None = None,
    ) -> Result:
        """open_query() with the cursor, if any, in Result.stream."""
        result, cursor = self.open_query(
            sql, params, reads=reads, start_index=start_index, first_bytes=first_bytes,
            max_row_bytes=max_row_bytes, client_id=client_id,
        )
        result.stream = cursor
        return result

    def open_query(
        self,
        sql: str,
        params: Any = (),
        *,
        at_index: int | None = None,
        reads: set[str] | None = None,
        start_index: int | None = None,
        first_bytes: int = 1 << 20,
        max_row_bytes: int | None = None,
        client_id: str | None = None,
    ) -> tuple[Result, ReadCursor | None]:
        """Start a read and return its first rows (about first_bytes of them) and, if more
        remain, a ReadCursor that streams the rest from the same snapshot (one SQLite read
        transaction, at Result.index) until it is exhausted or closed. Memory stays bounded
        by the chunk size, whatever the size of the result. max_row_bytes: a single row larger
        than this (it could not be sent in one frame) fails the read with a clear error."""
        self._sm._check_open()
        if at_index is not None and not self._sm.wait_applied(at_index, self.query_timeout_s):
            return Result(
                index=self._sm.applied_index,
                error=sql_error(
                    SQLITE_INTERRUPT,
                    TIMEOUT,
                    f"index {at_index} was not applied within {self.query_timeout_s} s",
                ),
            ), None
        reader = self.checkout()
        cursor = ReadCursor(self, reader, max_row_bytes)
        try:
            result = cursor.start(sql, params, reads, start_index, client_id)
            if result.error is None:
                result.rows, done = cursor.fetch(first_bytes)
                if result.rows is None:  # failed while fetching
                    result = Result(index=result.index, error=cursor.error)
                    done = True
                else:
                    result.bad_text = cursor.bad_text or None
            else:
                done = True
        except BaseException:
            cursor.close()
            raise
        if done:
            cursor.close()
            return result, None
        return result, cursor

    def open_reader(self, *, write_rules: bool) -> Reader:
        conn = apsw.Connection(self.path, flags=apsw.SQLITE_OPEN_READONLY)
        guard = Guard(write=write_rules)
        configure(conn, guard)
        reader = Reader(conn, guard)

        def progress() -> bool:
            if reader.active and time.monotonic() > reader.deadline:
                reader.timed_out = True
                return True
            return False

        def tracer(cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
            if reader.guard.internal or not cursor.has_vdbe:
                return True
            reader.guard.selects_left = None  # prepared: the flattening bound is done
            reader.traced += 1
            if reader.traced > 1:
                reader.abort = sql_error(
                    SQLITE_ERROR,
                    MULTIPLE_STATEMENTS,
                    "You can only execute one statement at a time.",
                )
                return False
            if not cursor.is_readonly:
                reader.abort = sql_error(
                    SQLITE_READONLY,
                    NOT_READONLY,
                    "query() runs read-only statements; send writes through the log",
                )
                return False
            known = reader.known
            reader.description = known if known is not None else cursor.get_description()
            reader.statement = sql
            reader.active = True
            return True

        conn.set_progress_handler(progress, PROGRESS_STEPS)
        conn.exec_trace = tracer
        return reader

    def checkout(self, *, write_rules: bool = False) -> Reader:
        """An idle connection of the pool (write_rules: the write-path sandbox, for checks that
        prepare and never step user SQL), or a new one."""
        with self._pool_lock:
            pool = self._pools[write_rules]
            if pool:
                return pool.pop()
        return self.open_reader(write_rules=write_rules)

    def checkin(self, reader: Reader) -> None:
        with self._pool_lock:
            if not self.closed:
                self._pools[reader.guard.write].append(reader)
                return
        reader.conn.close()

    def read_error(self, reader: Reader, e: BaseException) -> dict[str, Any]:
        if isinstance(e, apsw.ExecTraceAbort) and reader.abort is not None:
            return reader.abort
        if isinstance(e, apsw.InterruptError) and reader.timed_out:
            return sql_error(
                SQLITE_INTERRUPT, TIMEOUT, f"query exceeded the {self.query_timeout_s} s time limit"
            )
        err = common_error(e, reader.guard) or heap_limit_error(e)
        if err is None:  # environment errors are not replicated on the read path: report them
            code = getattr(e, "extendedresult", None) or SQLITE_ERROR
            err = sql_error(code, code_name(code), f"{type(e).__name__}: {e}")
        return err

    def close(self) -> None:
        with self._pool_lock:
            self.closed = True
            pools, self._pools = self._pools, {False: [], True: []}
        for pool in pools.values():
            for reader in pool:
                reader.conn.close()
