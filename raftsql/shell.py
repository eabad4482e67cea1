"""`raftsql shell DSN`: an interactive SQL shell in the spirit of the sqlite3 CLI, on the DB-API
driver (raftsql.driver).

Statements end when sqlite3.complete_statement says so (a ';' outside strings, comments and
trigger bodies) and may span lines. Each statement is its own replicated write, as in the sqlite3
CLI; BEGIN ... COMMIT (or ROLLBACK) groups statements into one driver transaction, applied as one
log entry at COMMIT. Errors go to stderr; with input piped in, the exit status is 1 if any
statement failed.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from raftsql.sqltext import first_keyword

HELP = """\
.tables               list tables
.schema [TABLE]       show CREATE statements
.nodes                every node: role, term, commit and applied index
.leader               the current leader
.status               the status of the node this shell talks to (JSON)
.consistency [LEVEL]  show or set read consistency: linearizable | leader | stale
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


def print_rows(cur, out=sys.stdout) -> None:
    """A cursor's rows as print_table prints them, BATCH_ROWS at a time: the columns are as wide
    as the header and the first batch need (a wider value later sticks out), so a result of any
    size is printed as it arrives, in bounded memory."""
    columns = [d[0] for d in cur.description]
    rows = cur.fetchmany(BATCH_ROWS)
    widths = print_table(columns, rows, out)
    while rows:
        rows = cur.fetchmany(BATCH_ROWS)
        for r in rows:
            cells = [_fmt(v) for v in r]
            out.write("  ".join(v.ljust(w) for v, w in zip(cells, widths, strict=True)).rstrip() + "\n")


def print_table(columns: list[str], rows: list, out=sys.stdout) -> list[int]:
    """Columns padded to their widest value, under a header and a rule (sqlite3's .mode column)."""
    if not columns:
        return []
    cells = [[_fmt(v) for v in r] for r in rows]
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
                print_rows(cur, self.out)
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
        """Run a dot command; returns False to quit."""
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
        elif cmd == ".timer":
            if args and args[0] in ("on", "off"):
                self.timer = args[0] == "on"
            else:
                self.error("Usage: .timer on|off")
        else:
            self.error(f'unknown command or invalid arguments: "{cmd[1:]}". Enter ".help" for help')
        self.out.flush()
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
        from raftsql.driver import complete_statement
        from raftsql.driver._sql import is_blank, split_script

        stdin = stdin or sys.stdin
        interactive = self.interactive = stdin.isatty()
        if interactive:
            self._setup_history()
            self.out.write(f"raftsql shell on {self.dsn}\nEnter \".help\" for usage hints.\n")
        buf: list[str] = []  # the lines of the statement being read
        lineno = start = 0  # input line numbers: now, and where the statement began
        bad_line: int | None = None  # a line of the statement that is not valid UTF-8

        def run(text: str) -> None:
            nonlocal bad_line
            if bad_line is not None:
                self.error("the input is not valid UTF-8 text: the statement is skipped (TEXT "
                           "is UTF-8; write other bytes as a blob literal, X'...')", bad_line)
                bad_line = None
                return
            for statement in split_script(text):
                try:
                    self.run_sql(statement, start)
                except KeyboardInterrupt:
                    self.interrupted(statement)
                    break  # and the rest of the line

        try:
            while stop_event is None or not stop_event.is_set():
                prompt = ("   ...> " if buf else "raftsql> ") if interactive else ""
                try:
                    line = input(prompt) if interactive else stdin.readline()
                except EOFError:
                    break
                except KeyboardInterrupt:
                    buf, bad_line = [], None
                    self.out.write("\n")
                    continue
                if not interactive and line == "":
                    break
                lineno += 1
                line = line.rstrip("\n")
                if line.strip().startswith(".") and (not buf or is_blank("\n".join(buf))):
                    buf = []  # comments before a dot command are only comments
                    if not self.dot(line.strip()):
                        break
                    continue
                if not buf and not line.strip():
                    continue
                if not buf:
                    start = lineno
                try:
                    line.encode("utf-8")
                except UnicodeEncodeError:  # bytes that are not UTF-8, kept as surrogates
                    bad_line = bad_line or lineno
                    line = line.encode("utf-8", "replace").decode("utf-8")
                buf.append(line)
                # Only a ';' can end a statement: no need to look again at a long one before.
                if ";" in line and complete_statement(text := "\n".join(buf)):
                    buf = []
                    run(text)
            text = "\n".join(buf)
            if buf and not is_blank(text):
                # End of input ends the last statement, as in sqlite3's shell.
                if complete_statement(text + "\n;"):
                    run(text + "\n;")
                else:
                    self.error(f"incomplete SQL: {' '.join(buf).strip()}", start)
        finally:
            if self.conn.in_transaction:
                self.err.write("note: the open transaction was rolled back (no COMMIT)\n")
            self.conn.close()
        return self.errors


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
