"""Cursor: runs statements through its Connection and holds one result set.

A read's rows arrive in chunks of about 1 MiB (driver/_client.py, FETCH_BYTES): the first with
the result, the rest fetched from the node as fetch*/iteration reach them, so a result of any
size costs about one chunk of memory. Every row of one result comes from one snapshot on the
node that served it (the state at the result's log index). Rows already handed out are not
kept. Cursors are not thread-safe (PEP 249 threadsafety 2: threads may share connections, not
cursors).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from raftsql.driver import _sql
from raftsql.driver._client import ResultStream, StreamLost
from raftsql.driver._exceptions import OperationalError, ProgrammingError, error_from_map
from raftsql.driver._types import adapt_params, column_converter, column_name, convert_value
from raftsql.protocol import DURABILITY

if TYPE_CHECKING:
    from raftsql.driver._connection import Connection

_CONSISTENCY = ("linearizable", "leader", "stale")


_ARRAYSIZE: Any = object()  # fetchmany()'s default: the cursor's arraysize


class Cursor:
    """A DB-API cursor. Extensions over sqlite3's:

    consistency  None (use the connection's) or "linearizable" | "leader" | "stale": the read
                 consistency of this cursor's reads that do not run inside a transaction
    min_index    None or a log index: stale reads wait until the node has applied it (for
                 causality across connections: set it to another connection's last_index); the
                 connection's own last_index is always included (read-your-writes)
    durability   None (use the connection's) or "quorum" | "leader": when this cursor's writes
                 outside a transaction are answered (Connection.durability)
    """

    def __init__(self, connection: Connection, /):
        self.connection = connection
        self._arraysize = 1
        self.row_factory = connection.row_factory
        self.min_index: int | None = None
        self._consistency: str | None = None
        self._durability: str | None = None
        self._closed = False
        self._lastrowid: int | None = None
        # (transaction, position in its steps) when lastrowid came from an INSERT of the open
        # transaction (see lastrowid).
        self._rowid_source: tuple[Any, int] | None = None
        self._reset()

    # ------------------------------------------------------------------ attributes

    @property
    def consistency(self) -> str | None:
        return self._consistency

    @consistency.setter
    def consistency(self, value: str | None) -> None:
        if value is not None and value not in _CONSISTENCY:
            raise ProgrammingError(f"consistency must be one of {', '.join(_CONSISTENCY)} or None")
        self._consistency = value

    @property
    def durability(self) -> str | None:
        return self._durability

    @durability.setter
    def durability(self, value: str | None) -> None:
        if value is not None and value not in DURABILITY:
            raise ProgrammingError(f"durability must be one of {', '.join(DURABILITY)} or None")
        self._durability = value

    @property
    def lastrowid(self) -> int | None:
        """The rowid of the last row this cursor's statements inserted, None before any. Inside
        a transaction it is the rowid the statement got when it ran; looking at it makes that
        rowid part of the commit check, so the commit applies only if the committed entry
        assigns the same one (else SerializationError). After the commit it is the committed
        entry's rowid."""
        source = self._rowid_source
        if source is not None:
            txn, pos = source
            if self.connection._txn is txn and pos < len(txn.steps):
                txn.steps[pos].rowid_seen = True
        return self._lastrowid

    @lastrowid.setter
    def lastrowid(self, value: int | None) -> None:
        self._lastrowid = value
        self._rowid_source = None

    def _reset(self) -> None:
        stream = getattr(self, "_stream", None)
        if stream is not None:
            stream.close()  # the rest of the previous result is not wanted
        self._stream: ResultStream | None = None
        # The transaction step this result belongs to: later chunks join its commit check.
        self._txn_step: Any = None
        self.description: tuple | None = None
        self.rowcount = -1
        self._rows: list[list] = []
        self._bad: dict[int, list[int]] = {}  # row position -> columns of TEXT that is not UTF-8
        self._pos = 0
        self._result: dict[str, Any] | None = None  # the last raw Result map (tests look at it)
        # detect_types: a converter per column (None: none), or None when no column has one.
        self._converters: list | None = None
        # Connection.interrupt() calls seen when this result arrived: a later one aborts it.
        self._interrupts = self.connection._interrupts

    def _check(self) -> None:
        if self._closed:
            raise ProgrammingError("Cannot operate on a closed cursor.")
        self.connection._check_open()

    # ------------------------------------------------------------------ execute*

    def execute(self, sql: str, parameters: Any = (), /) -> Cursor:
        """Run one statement: its own replicated write (or a read), or part of the connection's
        transaction, as the connection's autocommit and isolation_level say (as in sqlite3)."""
        self._check()
        if not isinstance(sql, str):
            raise TypeError(f"execute() argument 1 must be str, not {type(sql).__name__}")
        if "\x00" in sql:
            raise ProgrammingError("the query contains a null character")
        self._reset()
        params = adapt_params(parameters, _names(sql, parameters))
        self._load(self.connection._run_one(self, sql, params))
        return self

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any], /) -> Cursor:
        """Run one DML statement once per parameter set. Outside a transaction (autocommit) all
        of them are ONE log entry (on an error the sets before the failing one stay applied,
        as in sqlite3); otherwise they join the transaction. rowcount is the sum of the
        changes."""
        self._check()
        if not isinstance(sql, str):
            raise TypeError(f"executemany() argument 1 must be str, not {type(sql).__name__}")
        if "\x00" in sql:
            raise ProgrammingError("the query contains a null character")
        self._reset()
        if _sql.is_read_only(sql):
            raise ProgrammingError("executemany() can only execute DML statements.")
        names: tuple[str, ...] | None = None
        looked = False  # names are found at the first mapping
        params = []
        try:
            for p in seq_of_parameters:
                if not looked and isinstance(p, Mapping):
                    names, looked = _sql.named_parameters(sql), True
                params.append(adapt_params(p, names))
        except Exception:
            # A set that cannot be sent (a value with no adapter, a wrong parameter type, an
            # iterator that raises): sqlite3 has run every set before it by then, so run those,
            # then raise. (An error of theirs is raised instead, as sqlite3 would have first.)
            if params:
                result, rowcount = self.connection._run_many(self, sql, params)
                self._load(result, rowcount)
            raise
        result, rowcount = self.connection._run_many(self, sql, params)
        result.pop("lastrowid", None)  # sqlite3 leaves lastrowid as it was after executemany
        self._load(result, rowcount)
        return self

    def executescript(self, sql_script: str, /) -> Cursor:
        """With legacy transaction control, commit any pending transaction (as sqlite3), then run
        the script's statements as ONE atomic log entry: BEGIN/COMMIT/END statements are dropped
        (the script is already one transaction); other transaction control is refused by the
        server. With autocommit=False (or True inside an explicit BEGIN) the statements join the
        open transaction instead, as in sqlite3 (Connection._run_script)."""
        self._check()
        if not isinstance(sql_script, str):
            raise TypeError("script argument must be unicode.")
        if "\x00" in sql_script:
            raise ValueError("embedded null character")
        self._reset()
        result, rowcount = self.connection._run_script(self, sql_script)
        self._load(result, rowcount)
        return self

    def _load(self, result: dict[str, Any], rowcount: int | None = None) -> None:
        self._result = result
        err = result.get("error")
        if err:
            raise error_from_map(err)
        columns = result.get("columns") or []
        decltypes = result.get("decltypes") or []
        if columns:
            detect = self.connection._detect_types
            decl = [decltypes[i] if i < len(decltypes) else None for i in range(len(columns))]
            self.description = tuple(
                (column_name(name, detect), decl[i], None, None, None, None, None)
                for i, name in enumerate(columns)
            )
            if detect:
                convs = [column_converter(name, decl[i], detect) for i, name in enumerate(columns)]
                self._converters = convs if any(c is not None for c in convs) else None
        self._set_chunk(result.get("rows") or [], result.get("bad_text"))
        self._stream = result.pop("stream", None)
        if self._stream is not None:
            # Dropped unfinished, as sqlite3 finalizes a collected cursor: its rows are closed
            # on the node at the connection's next request.
            weakref.finalize(self, self._stream.abandon)
        self._txn_step = result.pop("txn_step", None)
        self.rowcount = rowcount if rowcount is not None else int(result.get("rowcount", -1))
        if result.get("lastrowid"):
            # Every log entry starts with last_insert_rowid() = 0, so 0 means "this statement
            # inserted nothing": keep the previous value, as sqlite3's connection-level one.
            self.lastrowid = result["lastrowid"]
            source = result.pop("rowid_source", None)
            if source is not None:
                self._rowid_source = source
                source[0].rowid_cursors.append((source[1], weakref.ref(self)))

    # ------------------------------------------------------------------ fetch*

    def _set_chunk(self, rows: list, bad: list | None) -> None:
        self._rows = rows
        self._pos = 0
        self._bad = {}
        for r, c in bad or ():
            self._bad.setdefault(r, []).append(c)

    def _more(self) -> bool:
        """Load the next chunk of a streamed result; False when there is none."""
        stream = self._stream
        while stream is not None and not stream.done:
            try:
                rows, bad, err = stream.fetch()
            except StreamLost as e:
                self._stream = None
                raise OperationalError(str(e)) from None
            if err:
                self._stream = None
                raise error_from_map(err)
            self._set_chunk(rows, bad)
            step = self._txn_step
            if step is not None:
                step.add_rows(rows)
                if stream.done:
                    step.complete = True
            if rows:
                return True
        self._stream = None
        return False

    def _next_row(self) -> Any:
        """The next row made (row_factory, text_factory), or None at the end."""
        self._check()
        if self._interrupts != self.connection._interrupts:
            # Connection.interrupt() since this result arrived: as sqlite3, the statement that
            # was still running fails once with "interrupted" and the cursor is reset.
            self._interrupts = self.connection._interrupts
            if self._pos < len(self._rows) or (self._stream is not None and not self._stream.done):
                self._reset()
                raise error_from_map({"code": 9, "name": "SQLITE_INTERRUPT", "message": "interrupted"})
        if self._pos >= len(self._rows) and not self._more():
            return None
        pos = self._pos
        self._pos += 1
        return self._make(self._rows[pos], self._bad.get(pos))

    def _make(self, row: list, bad: list[int] | None = None) -> Any:
        tf = self.connection.text_factory
        convs = self._converters
        if convs is not None:
            row = self._convert(row, convs, bad or (), tf)
        elif bad is not None or tf is not str:
            row = self._texts(row, bad or (), tf)
        else:
            row = tuple(row)
        rf = self.row_factory
        return rf(self, row) if rf is not None else row

    def _texts(self, row: list, bad: list[int], tf: Any) -> tuple:
        """Apply text_factory to the TEXT values of a row, as sqlite3 does: str values are
        TEXT; bytes at a `bad` column are TEXT that is not valid UTF-8."""
        out = list(row)
        for i, v in enumerate(out):
            if i in bad:
                if tf is str:
                    name = self.description[i][0] if self.description else str(i)
                    raise OperationalError(
                        f"Could not decode to UTF-8 column '{name}' with text "
                        f"'{v.decode('utf-8', 'replace')}'"
                    )
                out[i] = v if tf is bytes else tf(v)
            elif type(v) is str and tf is not str:
                b = v.encode("utf-8")
                out[i] = b if tf is bytes else tf(b)
        return tuple(out)

    def _convert(self, row: list, convs: list, bad: Any, tf: Any) -> tuple:
        """detect_types: a column with a converter gets it (from the value's bytes, text_factory
        not applied, as sqlite3); the others get text_factory."""
        plain = [v if convs[i] is None else None for i, v in enumerate(row)]
        if bad or tf is not str:
            plain = list(self._texts(plain, [i for i in bad if convs[i] is None], tf))
        return tuple(convert_value(v, conv) if conv is not None else plain[i]
                     for i, (v, conv) in enumerate(zip(row, convs, strict=True)))

    def fetchone(self) -> Any:
        return self._next_row()

    @property
    def arraysize(self) -> int:
        return self._arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        if not isinstance(value, int):
            raise TypeError(f"'{type(value).__name__}' object cannot be interpreted as an integer")
        self._arraysize = value

    def fetchmany(self, size: int = _ARRAYSIZE) -> list[Any]:
        if size is _ARRAYSIZE:
            n = self._arraysize
        elif isinstance(size, int):
            n = size
        else:  # sqlite3's: fetchmany(None) is no "use arraysize"
            raise TypeError(f"'{type(size).__name__}' object cannot be interpreted as an integer")
        out = []
        while n <= 0 or len(out) < n:  # sqlite3: a size of 0 (or less) fetches every row
            row = self._next_row()
            if row is None:
                break
            out.append(row)
        return out

    def fetchall(self) -> list[Any]:
        return self.fetchmany(-1)

    def __iter__(self) -> Cursor:
        return self

    def __next__(self) -> Any:
        row = self._next_row()
        if row is None:
            raise StopIteration
        return row

    # ------------------------------------------------------------------ the rest of PEP 249

    def setinputsizes(self, sizes: Any, /) -> None:
        """Does nothing (as sqlite3): values are sent as they are."""

    def setoutputsize(self, size: Any, column: Any = None, /) -> None:
        """Does nothing (as sqlite3): values come back whole."""

    def close(self) -> None:
        """Close the cursor; using it afterwards raises ProgrammingError. Idempotent."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._closed = True
        self._rows = []


def _names(sql: str, parameters: Any) -> tuple[str, ...] | None:
    """The statement's parameter names, when a mapping binds them (see adapt_params)."""
    return _sql.named_parameters(sql) if isinstance(parameters, Mapping) else None
