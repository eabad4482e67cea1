"""`raftsql shell DSN`: an interactive SQL shell in the spirit of the sqlite3 CLI."""

from __future__ import annotations

import os
import sys
import threading
import time

HELP = """\
.tables               list tables
.schema [TABLE]       show CREATE statements
.nodes                every node: role, term, commit and applied index
.leader               the current leader
.status               this connection's node status (JSON)
.consistency [LEVEL]  show or set read consistency: linearizable | leader | stale
.timer on|off         print how long each statement took
.help                 this text
.quit                 leave (Ctrl-D works too)
Statements end with ';' and may span lines."""


def _fmt(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bytes):
        return "x'" + v.hex() + "'"
    return str(v)


def print_table(columns: list[str], rows: list[list], out=sys.stdout) -> None:
    if not columns:
        return
    cells = [[_fmt(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for r in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() + "\n")


class Shell:
    def __init__(self, dsn: str, out=sys.stdout):
        from raftsql.driver._client import Client

        self.dsn = dsn
        self.client = Client.from_dsn(dsn)
        self.out = out
        self.timer = False

    def run_sql(self, sql: str) -> None:
        from raftsql.driver._client import ClientError

        t0 = time.perf_counter()
        try:
            res = self.client.execute([(sql, [])])
        except ClientError as e:
            self.out.write(f"Error: {e}\n")
            return
        took = time.perf_counter() - t0
        if res.get("error"):
            err = res["error"]
            self.out.write(f"Error: {err.get('message')} ({err.get('name')})\n")
        else:
            print_table(res.get("columns") or [], res.get("rows") or [], self.out)
            if not res.get("columns") and res.get("rowcount", -1) >= 0:
                self.out.write(f"{res['rowcount']} row(s) changed (log index {res.get('index')})\n")
        if self.timer:
            self.out.write(f"Run Time: {took * 1000:.2f} ms\n")

    def dot(self, line: str) -> bool:
        """Run a dot command; returns False to quit."""
        from raftsql.driver._admin import cluster_status

        parts = line.split()
        cmd, args = parts[0], parts[1:]
        if cmd in (".quit", ".exit"):
            return False
        if cmd == ".help":
            self.out.write(HELP + "\n")
        elif cmd == ".tables":
            self.run_sql("SELECT name FROM sqlite_schema WHERE type='table' AND name NOT LIKE '\\_raftsql%' ESCAPE '\\' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        elif cmd == ".schema":
            where = " AND name = " + "'" + args[0].replace("'", "''") + "'" if args else ""
            self.run_sql(f"SELECT sql FROM sqlite_schema WHERE sql IS NOT NULL AND name NOT LIKE '\\_raftsql%' ESCAPE '\\'{where} ORDER BY name")
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
            import json

            self.out.write(json.dumps(self.client.status(), indent=2, default=str) + "\n")
        elif cmd == ".consistency":
            if args:
                if args[0] not in ("linearizable", "leader", "stale"):
                    self.out.write("Error: consistency is linearizable, leader or stale\n")
                else:
                    self.client.consistency = args[0]
            self.out.write(f"consistency: {self.client.consistency}\n")
        elif cmd == ".timer":
            if args and args[0] in ("on", "off"):
                self.timer = args[0] == "on"
            else:
                self.out.write("Usage: .timer on|off\n")
        else:
            self.out.write(f"Error: unknown command {cmd}; try .help\n")
        return True

    def loop(self, stop_event: threading.Event | None = None, stdin=sys.stdin) -> None:
        interactive = stdin.isatty()
        if interactive:
            try:
                import readline

                hist = os.path.expanduser("~/.raftsql_history")
                if os.path.exists(hist):
                    readline.read_history_file(hist)
                import atexit

                atexit.register(readline.write_history_file, hist)
            except (ImportError, OSError):
                pass
            self.out.write(f"raftsql shell on {self.dsn}\nEnter .help for help; statements end with ';'\n")
        buf: list[str] = []
        while stop_event is None or not stop_event.is_set():
            prompt = ("   ...> " if buf else "raftsql> ") if interactive else ""
            try:
                line = input(prompt) if interactive else stdin.readline()
            except EOFError:
                break
            except KeyboardInterrupt:
                buf = []
                self.out.write("\n")
                continue
            if not interactive and line == "":
                break
            line = line.rstrip("\n")
            if not buf and line.strip().startswith("."):
                if not self.dot(line.strip()):
                    break
                continue
            buf.append(line)
            text = "\n".join(buf).strip()
            if text.endswith(";"):
                buf = []
                stmt = text.rstrip(";").strip()
                if stmt:
                    self.run_sql(stmt)
        self.client.close()


def run_shell(dsn: str, stop_event: threading.Event | None = None) -> None:
    Shell(dsn).loop(stop_event)
