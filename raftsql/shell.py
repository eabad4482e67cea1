"""`raftsql shell DSN`: an interactive SQL shell in the spirit of the sqlite3 CLI, on the DB-API
driver (raftsql.driver).

Statements end when sqlite3.complete_statement says so (a ';' outside strings, comments and
trigger bodies) and may span lines. Each statement is its own replicated write, as in the sqlite3
CLI; BEGIN ... COMMIT (or ROLLBACK) groups statements into one driver transaction, applied as one
log entry at COMMIT. Errors go to stderr; with input piped in, the exit status is 1 if any
statement failed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any

from raftsql.sqltext import first_keyword

HELP = """\
.tables               list tables
.schema [TABLE]       show CREATE statements
.nodes                every node: role, term, commit and applied index
.leader               the current leader
.status               the status of the node this shell talks to (JSON)
.consistency [LEVEL]  show or set read consistency: linearizable | leader | stale
.mode MODE            how results print: column (the default), list, csv, tabs, json, line
.headers on|off       column names above the rows in list, csv and tabs modes
.nullvalue TEXT       how NULL prints (column and line modes: NULL; the others: empty)
.separator SEP        the column separator of list mode (default |)
.dump [TABLE]         the schema and rows as SQL (tables matching a LIKE pattern)
.read FILE            run the statements and dot commands in FILE
.import [--csv] [--skip N] FILE TABLE
                      add FILE's rows to TABLE (made from FILE's first row if missing)
.output [FILE]        write results to FILE (truncated), or to the screen again
.once FILE            write the next command's output (a dot command, or one input line) to FILE
.timer on|off         print how long each statement took
.help                 this text
.quit                 leave (Ctrl-D works too)
Statements end with ';' and may span lines. BEGIN ... COMMIT makes one transaction."""

HISTORY_FILE = "~/.raftsql_history"
HISTORY_LENGTH = 1000


def _fmt(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bytes):
        return "x'" + v.hex() + "'"
    return str(v)


BATCH_ROWS = 1000  # rows fetched, sized and printed at a time
MODES = ("column", "list", "csv", "tabs", "json", "line")
READ_DEPTH = 16  # .read inside .read, as deep as this
IMPORT_BATCH_ROWS = 1000  # .import: rows per write (executemany), at most
IMPORT_BATCH_BYTES = 1 << 20  # ... and about this much text, well under a request's limit
IMPORT_FIELD_LIMIT = (1 << 31) - 1  # csv's default, 128 KiB, refused fields sqlite3 takes


def sql_literal(v) -> str:
    """A value as an SQL literal that reads back as the same value and type (.dump)."""
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "1e999" if v > 0 else "-1e999"
        text = repr(v)  # the shortest text that reads back as the same double
        return text if any(c in text for c in ".eE") else text + ".0"
    if isinstance(v, bytes):
        return "X'" + v.hex().upper() + "'"
    text = str(v)
    if "\x00" in text:  # no SQL string literal holds a NUL: spell the UTF-8 bytes
        return "CAST(X'" + text.encode("utf-8").hex().upper() + "' AS TEXT)"
    return "'" + text.replace("'", "''") + "'"


def quote_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Printer:
    """A cursor's rows in one of the sqlite3 shell's output modes (.mode), batch by batch."""

    def __init__(self, mode: str = "column", headers: bool = True, nullvalue: str | None = None,
                 separator: str = "|"):
        self.mode, self.headers, self.nullvalue, self.separator = mode, headers, nullvalue, separator

    def _cell(self, v, null_default: str) -> str:
        if v is None:
            return null_default if self.nullvalue is None else self.nullvalue
        return _fmt(v)

    def print(self, cur, out) -> None:
        mode = self.mode
        if mode == "column":
            print_rows(cur, out, _fmt if self.nullvalue is None else lambda v: self._cell(v, "NULL"))
            return
        columns = [d[0] for d in cur.description]
        if mode == "json":
            first = True
            while rows := cur.fetchmany(BATCH_ROWS):
                for r in rows:
                    obj = {c: _json_value(v) for c, v in zip(columns, r, strict=True)}
                    out.write(("[" if first else ",\n") + json.dumps(obj, ensure_ascii=False))
                    first = False
            if not first:
                out.write("]\n")
            return
        if mode == "line":
            width = max((len(c) for c in columns), default=0)
            first = True
            while rows := cur.fetchmany(BATCH_ROWS):
                for r in rows:
                    if not first:
                        out.write("\n")
                    first = False
                    for c, v in zip(columns, r, strict=True):
                        out.write(f"{c.rjust(width)} = {self._cell(v, 'NULL')}\n")
            return
        if mode == "csv":
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\r\n")
            if self.headers:
                writer.writerow(columns)
            while rows := cur.fetchmany(BATCH_ROWS):
                writer.writerows([self._cell(v, "") for v in r] for r in rows)
                out.write(buf.getvalue())
                buf.seek(0)
                buf.truncate()
            out.write(buf.getvalue())
            return
        sep = "\t" if mode == "tabs" else self.separator
        if self.headers:
            out.write(sep.join(columns) + "\n")
        while rows := cur.fetchmany(BATCH_ROWS):
            for r in rows:
                out.write(sep.join(self._cell(v, "") for v in r) + "\n")


def _json_value(v):
    """JSON has no blobs and no infinities: a blob is its hex text, +-Inf the text
    "Infinity" / "-Infinity" (json.dumps would write a bare Infinity, which is not JSON)."""
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, float) and math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return v


def print_rows(cur, out=sys.stdout, fmt=_fmt) -> None:
    """A cursor's rows as print_table prints them, BATCH_ROWS at a time: the columns are as wide
    as the header and the first batch need (a wider value later sticks out), so a result of any
    size is printed as it arrives, in bounded memory. fmt: a value's text."""
    columns = [d[0] for d in cur.description]
    rows = cur.fetchmany(BATCH_ROWS)
    widths = print_table(columns, rows, out, fmt)
    while rows:
        rows = cur.fetchmany(BATCH_ROWS)
        for r in rows:
            cells = [fmt(v) for v in r]
            out.write("  ".join(v.ljust(w) for v, w in zip(cells, widths, strict=True)).rstrip() + "\n")


def print_table(columns: list[str], rows: list, out=sys.stdout, fmt=_fmt) -> list[int]:
    """Columns padded to their widest value, under a header and a rule (sqlite3's .mode column)."""
    if not columns:
        return []
    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for r in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() + "\n")
    return widths


def _columns(names: list[str], width: int = 80) -> str:
    """Names in as many columns as fit in `width`, filled down then across (sqlite3's .tables)."""
    if not names:
        return ""
    w = max(len(n) for n in names) + 2
    ncols = max(1, width // w)
    nrows = -(-len(names) // ncols)
    lines = []
    for r in range(nrows):
        row = [names[i] for i in range(r, len(names), nrows)]
        lines.append("".join(n.ljust(w) for n in row).rstrip())
    return "\n".join(lines)


# raftsql's own tables (sqlite_raftsql_*) stay out of listings, as SQLite's do.
_TABLES_SQL = (
    "SELECT name FROM sqlite_schema WHERE type IN ('table', 'view') "
    "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' {where}ORDER BY name"
)
_SCHEMA_SQL = (
    "SELECT sql || ';' FROM sqlite_schema WHERE sql IS NOT NULL "
    "AND tbl_name NOT LIKE 'sqlite\\_raftsql\\_%' ESCAPE '\\' {where}ORDER BY tbl_name, type DESC, name"
)


# .dump: tables first (their rows after each), then indexes, triggers and views in the order
# they were made; raftsql's own tables never.
_DUMP_TABLES_SQL = (
    "SELECT name, sql FROM sqlite_schema WHERE type = 'table' AND sql IS NOT NULL "
    "AND name NOT LIKE 'sqlite\\_raftsql\\_%' ESCAPE '\\' "
    "AND (name LIKE ?1 OR name = 'sqlite_sequence') ORDER BY rowid"
)
_DUMP_REST_SQL = (
    "SELECT sql FROM sqlite_schema WHERE type IN ('index', 'trigger', 'view') AND sql IS NOT NULL "
    "AND tbl_name NOT LIKE 'sqlite\\_raftsql\\_%' ESCAPE '\\' AND tbl_name LIKE ?1 ORDER BY rowid"
)


class Shell:
    def __init__(self, dsn: str, out=None, err=None):
        import raftsql.driver as db

        self.db = db
        self.dsn = dsn
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.conn = db.connect(dsn, autocommit=True)
        self.timer = False
        self.errors = 0
        self.interactive = False  # set by loop()
        self.printer = Printer()
        self._reading: list[str] = []  # the files .read is in, innermost last
        self._screen = self.out  # where results go without .output
        self._once = False  # .once: back to the screen after the next statement

    def error(self, text: str, line: int | None = None) -> None:
        """An error on stderr; with piped input, near which input line (as sqlite3's shell)."""
        self.errors += 1
        where = f"near line {line}: " if line is not None and not self.interactive else ""
        self.err.write(f"Error: {where}{text}\n")
        self.err.flush()

    # ------------------------------------------------------------------ SQL

    def run_sql(self, sql: str, line: int | None = None) -> None:
        """Run one statement. Transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT, with or
        without comments) goes to the driver like any statement: its explicit transactions
        are the shell's, so the two cannot get out of step."""
        db = self.db
        t0 = time.perf_counter()
        try:
            cur = self.conn.execute(sql)
            if cur.description:
                self.printer.print(cur, self.out)
        except db.Error as e:
            name = getattr(e, "sqlite_errorname", None)
            self.error(f"{e}" + (f" ({name})" if name else ""), line)
            return
        took = time.perf_counter() - t0
        if not cur.description and cur.rowcount >= 0 and self.interactive:
            self.out.write(f"{cur.rowcount} row(s) changed\n")
        if self.timer:
            self.out.write(f"Run Time: {took * 1000:.2f} ms\n")
        self.out.flush()

    def interrupted(self, sql: str) -> None:
        """Ctrl-C while a statement ran: back to the prompt, as sqlite3's shell. Nothing can
        call the request back, so a write's outcome is unknown; an interrupted COMMIT also
        ends the transaction here (sending it again could apply it twice)."""
        if first_keyword(sql) in ("COMMIT", "END"):
            try:
                self.conn.rollback()
            except Exception:  # noqa: BLE001 - the connection may be gone too: nothing to keep
                pass
            self.error("interrupted: the COMMIT may or may not have been applied; check "
                       "before running the transaction again")
        else:
            self.error("interrupted: if the statement writes, it may or may not have been "
                       "applied; an open transaction goes on")
        self.out.flush()

    # ------------------------------------------------------------------ dot commands

    def dot(self, line: str) -> bool:
        """Run a dot command; returns False to quit. After .once, the next command (this one,
        unless it is .once or .output) writes to its file, then the screen again."""
        once = self._once and line.split()[0] not in (".once", ".output")
        try:
            return self._dot(line)
        finally:
            if once and self._once:
                self._redirect(None)

    def _dot(self, line: str) -> bool:
        from raftsql.driver._admin import cluster_status

        parts = line.split()
        cmd, args = parts[0], parts[1:]
        if cmd in (".quit", ".exit", ".q"):
            return False
        if cmd == ".help":
            self.out.write(HELP + "\n")
        elif cmd == ".tables":
            # As sqlite3: an optional LIKE pattern.
            where, params = ("", ()) if not args else ("AND name LIKE ? ", (args[0],))
            self._rows_plain(_TABLES_SQL.format(where=where), params,
                             lambda rows: _columns([r[0] for r in rows]))
        elif cmd == ".schema":
            where, params = ("", ()) if not args else ("AND tbl_name LIKE ? ", (args[0],))
            self._rows_plain(_SCHEMA_SQL.format(where=where), params,
                             lambda rows: "\n".join(r[0] for r in rows))
        elif cmd in (".nodes", ".leader"):
            rows = cluster_status(self.dsn)
            if cmd == ".leader":
                leaders = {r.get("leader") for r in rows if "error" not in r and r.get("leader")}
                addr = next((r.get("leader_address") for r in rows if r.get("leader_address")), None)
                self.out.write(f"{', '.join(sorted(leaders)) or 'no leader known'}" + (f" at {addr}" if addr else "") + "\n")
            else:
                print_table(["id", "address", "role", "term", "leader", "commit", "applied"],
                            [[r.get("id", "?"), r.get("address"), r.get("role", r.get("error")), r.get("term"),
                              r.get("leader"), r.get("commit_index"), r.get("applied_index")] for r in rows], self.out)
        elif cmd == ".status":
            try:
                self.out.write(json.dumps(self.conn.status(), indent=2, default=str) + "\n")
            except self.db.Error as e:
                self.error(str(e))
        elif cmd == ".consistency":
            if args:
                try:
                    self.conn.consistency = args[0]
                except self.db.ProgrammingError:
                    self.error("consistency is linearizable, leader or stale")
                    return True
            self.out.write(f"consistency: {self.conn.consistency}\n")
        elif cmd == ".mode":
            if len(args) == 1 and args[0] in MODES:
                self.printer.mode = args[0]
                if args[0] == "column":
                    self.printer.headers = True
            elif not args:
                self.out.write(f"current output mode: {self.printer.mode}\n")
            else:
                self.error(f"Usage: .mode {'|'.join(MODES)}")
        elif cmd == ".headers":
            if len(args) == 1 and args[0] in ("on", "off"):
                self.printer.headers = args[0] == "on"
            else:
                self.error("Usage: .headers on|off")
        elif cmd == ".nullvalue":
            value = _dot_argument(line)
            if value is None:
                self.error("Usage: .nullvalue TEXT")
            else:
                self.printer.nullvalue = value
        elif cmd == ".separator":
            value = _dot_argument(line)
            if not value:
                self.error("Usage: .separator SEPARATOR")
            else:
                self.printer.separator = _unescape(value)
        elif cmd == ".dump":
            self.dump(args[0] if args else None)
        elif cmd == ".read":
            path = _dot_argument(line)
            if not path:
                self.error("Usage: .read FILE")
            else:
                return self.read(path)
        elif cmd in (".output", ".once"):
            target = _dot_argument(line)
            if cmd == ".once" and not target:
                self.error("Usage: .once FILE")
            elif target and target.startswith("|"):
                self.error(f"{cmd}: pipes to commands are not supported; write to a file")
            else:
                self._redirect(None if target in (None, "stdout") else target, once=cmd == ".once")
            return True
        elif cmd == ".import":
            try:
                self.import_file(shlex.split(line)[1:])  # "my table": one argument
            except ValueError as e:
                self.error(f".import: {e}")
        elif cmd == ".timer":
            if args and args[0] in ("on", "off"):
                self.timer = args[0] == "on"
            else:
                self.error("Usage: .timer on|off")
        else:
            self.error(f'unknown command or invalid arguments: "{cmd[1:]}". Enter ".help" for help')
        self.out.flush()
        return True

    def _redirect(self, path: str | None, once: bool = False) -> None:
        """Results to the file at `path` (None: to the screen again)."""
        if self.out is not self._screen:
            self.out.close()
        self.out, self._once = self._screen, False
        if path is None:
            return
        try:
            # newline="": the csv mode's CRLF stays as it is, as sqlite3 writes it.
            self.out = open(os.path.expanduser(path), "w", encoding="utf-8", newline="")
        except OSError as e:
            self.error(f"cannot open \"{path}\": {e.strerror or e}")
            return
        self._once = once

    # ------------------------------------------------------------------ .import

    def import_file(self, args: list[str]) -> None:
        """.import [--csv] [--skip N] FILE TABLE, as sqlite3's shell: CSV (with --csv or in
        .mode csv) or lines split at the separator (tabs in .mode tabs, else .separator). A
        missing TABLE is made with TEXT columns named by the first row. Each batch of rows is
        one write (sqlite3 makes the whole import one transaction); a row that fails is noted
        and skipped, as sqlite3 does."""
        usage = "Usage: .import [--csv] [--skip N] FILE TABLE"
        csv_mode, skip, rest = self.printer.mode == "csv", 0, []
        it = iter(args)
        for a in it:
            if a == "--csv":
                csv_mode = True
            elif a == "--skip":
                try:
                    skip = int(next(it))
                except (StopIteration, ValueError):
                    self.error(usage)
                    return
            elif a.startswith("--"):
                self.error(f'.import: unknown option "{a}". {usage}')
                return
            else:
                rest.append(a)
        if len(rest) != 2 or skip < 0:
            self.error(usage)
            return
        path, table = os.path.expanduser(rest[0]), rest[1]
        try:
            f = open(path, encoding="utf-8-sig", newline="")  # (a BOM is not data)
        except OSError as e:
            self.error(f"cannot open \"{rest[0]}\": {e.strerror or e}")
            return
        sep = "," if csv_mode else "\t" if self.printer.mode == "tabs" else self.printer.separator
        csv.field_size_limit(IMPORT_FIELD_LIMIT)
        with f:
            if len(sep) == 1:  # CSV rules (quotes, line breaks in quotes) at that separator
                rows: Any = csv.reader(f, delimiter=sep)
            else:
                rows = (line.rstrip("\r\n").split(sep) for line in f)
            try:
                self._import_rows(rows, rest[0], table, skip)
            except UnicodeDecodeError:
                self.error(f".import {rest[0]}: the file is not UTF-8 text")
            except csv.Error as e:
                self.error(f".import {rest[0]}: {e}")

    def _import_rows(self, rows, name: str, table: str, skip: int) -> None:
        db = self.db
        try:
            found = self.conn.execute(
                "SELECT 1 FROM sqlite_schema WHERE type IN ('table', 'view') AND name = ? "
                "COLLATE NOCASE", (table,)).fetchone()
            for _ in range(skip):
                next(rows, None)
            if found is None:
                header = next(rows, None)
                if not header:
                    self.error(f".import {name}: empty file, so no columns for {table}")
                    return
                cols = ", ".join(f"{quote_name(c)} TEXT" for c in _column_names(header))
                self.conn.execute(f"CREATE TABLE {quote_name(table)}({cols})")
            width = len(self.conn.execute(f"SELECT * FROM {quote_name(table)} LIMIT 0").description)
        except db.Error as e:
            self.error(f".import {name}: {e}")
            return
        sql = f"INSERT INTO {quote_name(table)} VALUES ({', '.join('?' * width)})"
        batch: list[list[str]] = []
        lines: list[int] = []  # the file line of each row of the batch
        size = 0
        self._imported = 0
        line = skip + (found is None)
        for row in rows:
            line = getattr(rows, "line_num", line + 1)  # a CSV field may hold line breaks
            row = row or [""]  # an empty line is one empty field, as sqlite3 reads it
            if len(row) != width:
                what = "filling the rest with NULL" if len(row) < width else "extras ignored"
                self.err.write(f"{name}:{line}: expected {width} columns but found {len(row)} - {what}\n")
                row = (row + [None] * width)[:width]
            batch.append(row)
            lines.append(line)
            size += sum(len(v) for v in row if v)
            if len(batch) >= IMPORT_BATCH_ROWS or size >= IMPORT_BATCH_BYTES:
                if not self._import_batch(sql, batch, lines, name):
                    return
                batch, lines, size = [], [], 0
        if batch:
            self._import_batch(sql, batch, lines, name)

    def _import_batch(self, sql: str, batch: list, lines: list[int], name: str) -> bool:
        """One write of rows; a row that fails is noted with its file line and skipped, and the
        rest go on, as sqlite3's .import does ("FILE:LINE: INSERT failed: ...")."""
        while batch:
            try:
                self.conn.executemany(sql, batch)
            except self.db.Error as e:
                j = getattr(e, "parameter_set", None)
                if j is None or not 0 <= j < len(batch):
                    self.error(f".import {name}: stopped near line {lines[0]}: {e} "
                               f"({self._imported} rows added before it)")
                    return False
                self.err.write(f"{name}:{lines[j]}: INSERT failed: {e}\n")
                self._imported += j  # the rows before it were added
                batch, lines = batch[j + 1:], lines[j + 1:]
                continue
            self._imported += len(batch)
            break
        return True

    def _rows_plain(self, sql: str, params, render) -> None:
        try:
            rows = self.conn.execute(sql, params).fetchall()
        except self.db.Error as e:
            self.error(str(e))
            return
        text = render(rows)
        if text:
            self.out.write(text + "\n")

    # ------------------------------------------------------------------ the loop

    def _setup_history(self) -> None:
        try:
            import readline
        except ImportError:
            return
        hist = os.path.expanduser(HISTORY_FILE)
        try:
            readline.read_history_file(hist)
        except OSError:
            pass
        readline.set_history_length(HISTORY_LENGTH)
        import atexit

        def save() -> None:
            try:
                readline.write_history_file(hist)
            except OSError:
                pass

        atexit.register(save)

    def loop(self, stop_event: threading.Event | None = None, stdin=None) -> int:
        """Read statements and dot commands until EOF or .quit; returns the number of errors."""
        stdin = stdin or sys.stdin
        interactive = self.interactive = stdin.isatty()
        if interactive:
            # Ctrl-C interrupts a statement (KeyboardInterrupt), even if this process was
            # started with SIGINT ignored (a job started in the background by a script).
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.default_int_handler)
            self._setup_history()
            self.out.write(f"raftsql shell on {self.dsn}\nEnter \".help\" for usage hints.\n")
        reader = _Reader(self)
        lineno = 0
        try:
            while stop_event is None or not stop_event.is_set():
                prompt = ("   ...> " if reader.buf else "raftsql> ") if interactive else ""
                try:
                    line = input(prompt) if interactive else stdin.readline()
                except EOFError:
                    break
                except KeyboardInterrupt:
                    reader.reset()
                    self.out.write("\n")
                    continue
                if not interactive and line == "":
                    break
                lineno += 1
                try:
                    if not reader.feed(line.rstrip("\n"), lineno):
                        break
                except KeyboardInterrupt:  # between statements (a running one handles its own)
                    reader.reset()
                    self.out.write("\n")
            reader.finish()
        finally:
            if self.conn.in_transaction:
                self.err.write("note: the open transaction was rolled back (no COMMIT)\n")
            self.conn.close()
            self._redirect(None)  # closes an .output file
        return self.errors

    def read(self, path: str) -> bool:
        """.read: run a file's statements and dot commands as if typed; False if one was .quit."""
        path = os.path.expanduser(path)
        if len(self._reading) >= READ_DEPTH:
            self.error(f".read {path}: nested more than {READ_DEPTH} deep")
            return True
        try:
            f = open(path, encoding="utf-8", errors="surrogateescape", newline=None)
        except OSError as e:
            self.error(f"cannot open \"{path}\": {e.strerror or e}")
            return True
        reader = _Reader(self)
        self._reading.append(path)
        try:
            with f:
                for lineno, line in enumerate(f, 1):
                    if not reader.feed(line.rstrip("\n"), lineno):
                        return False
            reader.finish()
        finally:
            self._reading.pop()
        return True

    # ------------------------------------------------------------------ .dump

    def dump(self, pattern: str | None) -> None:
        """The schema and rows as SQL text that rebuilds them, in the sqlite3 shell's .dump
        format (BEGIN TRANSACTION ... COMMIT). Not a snapshot: each table is read at its own
        moment, as concurrent writes go on; `raftsql backup` makes a consistent copy."""
        out = self.out
        try:
            tables = self.conn.execute(_DUMP_TABLES_SQL, (pattern or "%",)).fetchall()
            kinds = {r[1]: r[2] for r in self.conn.execute("PRAGMA table_list").fetchall()
                     if r[0] == "main"}
        except self.db.Error as e:
            self.error(f".dump: {e}")
            return
        out.write("PRAGMA foreign_keys=OFF;\nBEGIN TRANSACTION;\n")
        sequences = False
        for name, sql in tables:
            kind = kinds.get(name, "table")
            if kind == "shadow":
                continue  # a virtual table's own storage: its CREATE VIRTUAL TABLE makes it
            if name == "sqlite_sequence":
                # AUTOINCREMENT counters: only in a whole dump (a partial one would reset
                # the counters of tables it does not hold).
                sequences = pattern is None
                continue
            out.write(sql + ";\n")
            try:
                self._dump_rows(name)
            except self.db.Error as e:
                self.error(f".dump {name}: {e}")
        if sequences:
            out.write("DELETE FROM sqlite_sequence;\n")
            try:
                self._dump_rows("sqlite_sequence")
            except self.db.Error as e:
                self.error(f".dump sqlite_sequence: {e}")
        try:
            rest = self.conn.execute(_DUMP_REST_SQL, (pattern or "%",)).fetchall()
        except self.db.Error as e:
            self.error(f".dump: {e}")
            rest = []
        for (sql,) in rest:
            out.write(sql + ";\n")
        out.write("COMMIT;\n")
        out.flush()

    def _dump_rows(self, table: str) -> None:
        cols = self.conn.execute(f"PRAGMA table_xinfo({quote_name(table)})").fetchall()
        # Generated and hidden columns cannot be inserted: name the others.
        names = [c[1] for c in cols if c[6] == 0]
        if not names:
            return
        listed = "" if len(names) == len(cols) else "(" + ",".join(quote_name(n) for n in names) + ")"
        head = f"INSERT INTO {quote_name(table)}{listed} VALUES("
        cur = self.conn.execute(f"SELECT {','.join(quote_name(n) for n in names)} FROM {quote_name(table)}")
        out = self.out
        while rows := cur.fetchmany(BATCH_ROWS):
            out.write("".join(head + ",".join(map(sql_literal, r)) + ");\n" for r in rows))


class _Reader:
    """Lines in, statements and dot commands run (the shell's input, and each .read file's)."""

    def __init__(self, shell: Shell):
        self.shell = shell
        self.buf: list[str] = []  # the lines of the statement being read
        self.start = 0  # the input line where it began
        self.bad_line: int | None = None  # a line of the statement that is not valid UTF-8

    def reset(self) -> None:
        self.buf, self.bad_line = [], None

    def feed(self, line: str, lineno: int) -> bool:
        """One input line (without its newline); False if it was .quit."""
        from raftsql.driver import complete_statement
        from raftsql.driver._sql import is_blank

        buf = self.buf
        if line.strip().startswith(".") and (not buf or is_blank("\n".join(buf))):
            self.buf = []  # comments before a dot command are only comments
            return self.shell.dot(line.strip())
        if not buf and not line.strip():
            return True
        if not buf:
            self.start = lineno
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8, kept as surrogates
            self.bad_line = self.bad_line or lineno
            line = line.encode("utf-8", "replace").decode("utf-8")
        buf.append(line)
        # Only a ';' can end a statement: no need to look again at a long one before.
        if ";" in line and complete_statement(text := "\n".join(buf)):
            self.buf = []
            self._run(text)
        return True

    def finish(self) -> None:
        """End of input ends the last statement, as in sqlite3's shell."""
        from raftsql.driver import complete_statement
        from raftsql.driver._sql import is_blank

        text = "\n".join(self.buf)
        if self.buf and not is_blank(text):
            if complete_statement(text + "\n;"):
                self._run(text + "\n;")
            else:
                self.shell.error(f"incomplete SQL: {' '.join(self.buf).strip()}", self.start)
        self.buf = []

    def _run(self, text: str) -> None:
        from raftsql.driver._sql import split_script

        shell = self.shell
        if self.bad_line is not None:
            shell.error("the input is not valid UTF-8 text: the statement is skipped (TEXT "
                        "is UTF-8; write other bytes as a blob literal, X'...')", self.bad_line)
            self.bad_line = None
            return
        try:
            for statement in split_script(text):
                try:
                    shell.run_sql(statement, self.start)
                except KeyboardInterrupt:
                    shell.interrupted(statement)
                    break  # and the rest of the line
        finally:
            if shell._once:  # .once: this input's statements were the next command
                shell._redirect(None)


def _column_names(header: list[str]) -> list[str]:
    """A new table's column names from a file's first row, as sqlite3's .import makes them: an
    empty name is '?', and every name that occurs more than once (in any case) gets _1, _2..."""
    names = [h or "?" for h in header]
    seen = Counter(n.lower() for n in names)
    counts: dict[str, int] = {}
    out = []
    for n in names:
        if seen[n.lower()] > 1:
            counts[n.lower()] = counts.get(n.lower(), 0) + 1
            n = f"{n}_{counts[n.lower()]}"
        out.append(n)
    return out


_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}


def _unescape(text: str) -> str:
    """\\t, \\n, \\r and \\\\ in a dot command's argument, as the sqlite3 shell reads them."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _dot_argument(line: str) -> str | None:
    """The text after a dot command's name, unquoted if it is one quoted word."""
    parts = line.split(None, 1)
    if len(parts) < 2:
        return None
    rest = parts[1].strip()
    if len(rest) >= 2 and rest[0] == rest[-1] and rest[0] in "'\"":
        return rest[1:-1]
    return rest


def run_shell(dsn: str, stop_event: threading.Event | None = None) -> None:
    shell = Shell(dsn)
    try:
        errors = shell.loop(stop_event)
    except BrokenPipeError:
        # The reader went away (`raftsql shell ... | head`): stop quietly, as sqlite3 does.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(0) from None
    if errors and stop_event is None and not sys.stdin.isatty():
        raise SystemExit(1)
