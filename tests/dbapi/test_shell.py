"""`raftsql shell DSN` feels like the sqlite3 shell: a script piped to
`python -m raftsql.cli shell DSN`, and an interactive session on a pseudo-terminal (history)."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
import uuid

SCRIPT = """\
.help
CREATE TABLE pets (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,  -- a comment; with a semicolon
    kind TEXT
);
INSERT INTO pets (name, kind) VALUES ('Rex', 'dog'), ('Tom', 'cat');
SELECT id, name, kind
  FROM pets
 ORDER BY id;
.tables
.schema pets
BEGIN;
INSERT INTO pets (name) VALUES ('Ghost');
ROLLBACK;
BEGIN;
INSERT INTO pets (name, kind) VALUES ('Nemo', 'fish');
INSERT INTO pets (name, kind) VALUES ('Polly', NULL);
COMMIT;
SELECT count(*) AS n FROM pets; SELECT max(id) AS top FROM pets;
SELEC oops;
.consistency stale
SELECT name FROM pets WHERE kind IS NULL;
.consistency
.timer on
SELECT 1 AS one;
.timer off
.nodes
.leader
.status
.bogus
.quit
SELECT 'never runs';
"""


def _run(cluster, script: str):
    return subprocess.run([sys.executable, "-m", "raftsql.cli", "shell", cluster.dsn],
                          input=script, capture_output=True, text=True, timeout=120)


class _Terminal:
    """What a shell writes to a pseudo-terminal's master side, matched token by token."""

    def __init__(self, master: int):
        self.master = master
        self.seen = b""
        self.pos = 0  # everything before pos has been matched already

    def read_until(self, token: bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while token not in self.seen[self.pos:] and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError:
                    break
        assert token in self.seen[self.pos:], self.seen[self.pos:].decode(errors="replace")
        self.pos = self.seen.index(token, self.pos) + len(token)


def test_piped_script(cluster):
    out = _run(cluster, SCRIPT)
    stdout, stderr = out.stdout, out.stderr
    assert out.returncode == 1, (stdout, stderr)  # an error happened (SELEC), as sqlite3 -bail off
    # .help
    for cmd in (".tables", ".schema", ".nodes", ".leader", ".status", ".consistency", ".timer",
                ".help", ".quit"):
        assert cmd in stdout
    # multi-line statements and readable tables
    assert "id  name  kind\n--  ----  ----\n1   Rex   dog\n2   Tom   cat\n" in stdout
    assert "row(s) changed" not in stdout  # as sqlite3: piped writes print nothing
    # .tables / .schema
    tables = stdout[stdout.index("2   Tom   cat"):stdout.index("CREATE TABLE pets")]
    assert "pets" in tables.split()
    assert "CREATE TABLE pets (\n    id INTEGER PRIMARY KEY," in stdout
    # BEGIN ... ROLLBACK applies nothing; BEGIN ... COMMIT applies both
    assert "n\n-\n4\n" in stdout
    assert "top\n---\n4\n" in stdout  # two statements on one line both ran
    assert "Ghost" not in stdout
    # errors go to stderr with SQLite's message and name
    assert 'Error: near line 21: near "SELEC": syntax error (SQLITE_ERROR)' in stderr
    assert 'Error: unknown command or invalid arguments: "bogus"' in stderr
    # .consistency, stale read still sees our writes
    assert "consistency: stale\nname\n-----\nPolly\nconsistency: stale\n" in stdout
    # .timer
    assert "one\n---\n1\nRun Time: " in stdout
    # .nodes: a row per node, one leader
    node_rows = [line for line in stdout.splitlines() if line.startswith(tuple(cluster.ids))]
    roles = [line.split()[2] for line in node_rows if len(line.split()) > 3 and ":" in line.split()[1]]
    assert sorted(roles) == ["follower", "follower", "leader"], stdout
    # .leader
    leader = cluster.wait_leader()
    assert f"{leader} at {cluster.address(leader)}" in stdout
    # .status: JSON of the node the shell talks to
    start = stdout.index("{\n")
    status, _ = json.JSONDecoder().raw_decode(stdout[start:])
    assert status["role"] in ("leader", "follower") and status["leader"] == leader
    # .quit stops reading
    assert "never runs" not in stdout


def test_interactive_session_keeps_history(cluster, tmp_path):
    """On a terminal: prompts, continuation prompts, and readline history in ~/.raftsql_history."""
    master, slave = pty.openpty()
    env = {**os.environ, "HOME": str(tmp_path), "TERM": "dumb"}
    proc = subprocess.Popen([sys.executable, "-m", "raftsql.cli", "shell", cluster.dsn],
                            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    term = _Terminal(master)
    read_until = term.read_until
    try:
        read_until(b"usage hints")
        read_until(b"raftsql> ")
        os.write(master, b"SELECT 6 *\n")
        read_until(b"...> ")
        os.write(master, b"7 AS answer;\n")
        read_until(b"------\r\n42")  # the table: header, rule, value
        read_until(b"raftsql> ")
        os.write(master, b".quit\n")
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert "answer" in term.seen.decode(errors="replace")
    history = (tmp_path / ".raftsql_history").read_text()
    assert "SELECT 6 *" in history and "7 AS answer;" in history


def test_ctrl_c_during_a_statement_returns_to_the_prompt_and_keeps_the_transaction(cluster, tmp_path):
    """Ctrl-C while a statement runs (here a runaway recursive query inside a transaction)
    interrupts it, as in sqlite3's shell: the shell stays, and so does the open transaction
    (it used to print "Aborted!" and exit, losing it)."""
    master, slave = pty.openpty()
    env = {**os.environ, "HOME": str(tmp_path), "TERM": "dumb"}

    def controlling_terminal() -> None:  # so that Ctrl-C on the terminal is a SIGINT
        # (The shell sets Ctrl-C to interrupt itself: this test started under a script that
        # ignores SIGINT, as `nohup cmd &` does, failed before it did.)
        import fcntl
        import termios

        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, "-m", "raftsql.cli", "shell", cluster.dsn],
                            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                            preexec_fn=controlling_terminal)
    os.close(slave)
    read_until = _Terminal(master).read_until
    table = f"ctrlc_{os.getpid()}"
    try:
        read_until(b"raftsql> ")
        for line in (f"CREATE TABLE {table} (x);", "BEGIN;", f"INSERT INTO {table} VALUES (1);"):
            os.write(master, line.encode() + b"\n")
            read_until(b"raftsql> ")
        # About 3 s before the node's step limit stops it on a quiet machine (each row makes a
        # 600-character string), so the Ctrl-C below lands while it runs (a plain count reached
        # the limit in 0.9 s, close to the 0.7 s wait).
        os.write(master, b"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                         b"SELECT count(*) FROM c WHERE length(hex(zeroblob(300 + x % 2))) > 0;\n")
        time.sleep(0.7)
        os.write(master, b"\x03")  # Ctrl-C, delivered as SIGINT by the terminal
        read_until(b"interrupted")
        read_until(b"raftsql> ")
        os.write(master, b"COMMIT;\n")
        read_until(b"raftsql> ")
        os.write(master, f"SELECT count(*) AS n FROM {table};\n".encode())
        read_until(b"n\r\n")
        read_until(b"1\r\n")
        os.write(master, b".quit\n")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_piped_scripts_lose_nothing_sqlite3_would_run(cluster):
    """Transaction statements with comments, a last statement without ';', a comment before a
    dot command, and a long multi-line statement: what sqlite3's shell runs, this one runs."""
    t = "lose_" + uuid.uuid4().hex[:8]
    rows = ",\n".join(f"({i})" for i in range(5000))
    script = (
        f"CREATE TABLE {t}(x);\n"
        "/* load */ BEGIN;\n"
        f"INSERT INTO {t} VALUES(1);\n"
        "/* ok */ COMMIT;\n"
        f"INSERT INTO {t} VALUES(2);\n"
        f"BEGIN /* tx */;\nINSERT INTO {t} VALUES(3);\nCOMMIT -- done\n;\n"
        "-- a comment before a dot command\n"
        f".tables {t[:6]}%\n"
        f"INSERT INTO {t} VALUES\n{rows};\n"
        f"SELECT count(*) AS n, sum(x) AS s FROM {t}\n"  # no ';': end of input ends it
    )
    out = _run(cluster, script)
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert out.stderr == ""
    assert out.stdout.startswith(f"{t}\n")  # .tables ran, with its LIKE pattern
    assert f"n     s\n----  --------\n5003  {6 + sum(range(5000))}\n" in out.stdout, out.stdout


def test_piped_scripts_report_bad_input_without_a_traceback(cluster):
    out = subprocess.run([sys.executable, "-m", "raftsql.cli", "shell", cluster.dsn],
                         input=b"CREATE TABLE u(x);\nINSERT INTO u VALUES('caf\xe9');\n"
                               b"INSERT INTO u VALUES('ok');\nSELECT x FROM u;\nBEGIN;\n"
                               b"INSERT INTO u VALUES('lost');\n",
                         capture_output=True, timeout=120)
    stdout, stderr = out.stdout.decode(), out.stderr.decode()
    assert out.returncode == 1 and "Traceback" not in stderr, stderr
    assert "near line 2: the input is not valid UTF-8" in stderr
    assert "x\n--\nok\n" in stdout
    assert "the open transaction was rolled back (no COMMIT)" in stderr


def test_output_modes(cluster):
    """.mode list/csv/tabs/json/line, .headers, .nullvalue and .separator, as sqlite3's shell."""
    t = "modes_" + uuid.uuid4().hex[:8]
    script = (
        f"CREATE TABLE {t}(a, b);\n"
        f"INSERT INTO {t} VALUES (1, 'x,y'), (NULL, 'say \"hi\"'), (2.5, X'00ff');\n"
        f"SELECT a, b FROM {t} ORDER BY rowid;\n"
        ".mode csv\n"
        f"SELECT a, b FROM {t} ORDER BY rowid;\n"
        ".mode list\n.headers off\n.separator ;\n"
        f"SELECT a, b FROM {t} ORDER BY rowid;\n"
        ".mode tabs\n.nullvalue '(null)'\n"
        f"SELECT a, b FROM {t} ORDER BY rowid;\n"
        ".mode json\n"
        f"SELECT a, b FROM {t} ORDER BY rowid;\n"
        ".mode line\n"
        f"SELECT a, b AS bee FROM {t} WHERE a = 1;\n"
        ".mode\n.mode bogus\n"
    )
    out = _run(cluster, script)
    assert out.returncode == 1, (out.stdout, out.stderr)  # .mode bogus
    assert "Usage: .mode column|list|csv|tabs|json|line" in out.stderr
    assert out.stdout.count("Usage") == 0
    o = out.stdout
    assert "a     b\n----  --------\n1     x,y\nNULL  say \"hi\"\n2.5   x'00ff'\n" in o, o
    # (CSV lines end in CRLF, as sqlite3's; the text-mode pipe reads them as newlines)
    assert 'a,b\n1,"x,y"\n,"say ""hi"""\n2.5,x\'00ff\'\n' in o, o
    assert '1;x,y\n;say "hi"\n2.5;x\'00ff\'\n' in o, o
    assert '1\tx,y\n(null)\tsay "hi"\n2.5\tx\'00ff\'\n' in o, o
    rows = json.loads(o[o.index("[{"):o.index("}]") + 2])
    assert rows == [{"a": 1, "b": "x,y"}, {"a": None, "b": 'say "hi"'}, {"a": 2.5, "b": "00ff"}]
    assert "  a = 1\nbee = x,y\n" in o, o
    assert "current output mode: line" in o


def test_dump_rebuilds_the_database_in_sqlite3_and_in_raftsql(cluster, tmp_path):
    """.dump writes SQL that rebuilds the tables, rows, indexes, triggers and views: plain sqlite3
    reads it back to the same rows, and so does the cluster (after the tables are dropped)."""
    import sqlite3

    p = "dump" + uuid.uuid4().hex[:6]
    script = (
        f"CREATE TABLE {p}_a(id INTEGER PRIMARY KEY AUTOINCREMENT, v, g INT GENERATED ALWAYS AS (id * 2));\n"
        f"CREATE TABLE \"{p}_b x\"(k TEXT PRIMARY KEY, n REAL, blob BLOB) WITHOUT ROWID;\n"
        f"CREATE INDEX {p}_ai ON {p}_a(v);\n"
        f"CREATE VIEW {p}_v AS SELECT v FROM {p}_a;\n"
        f"CREATE TRIGGER {p}_t AFTER INSERT ON {p}_a BEGIN SELECT 1; END;\n"
        f"INSERT INTO {p}_a(v) VALUES ('it''s'), (NULL), (3), (1.5e300), (X'0001'), ('multi\nline'), (9223372036854775807);\n"
        f"DELETE FROM {p}_a WHERE v = 3;\n"
        f"INSERT INTO \"{p}_b x\" VALUES ('k1', 0.1, X''), ('k2', -0.0, NULL), ('k\"3', 1e999, x'ff');\n"
        f".dump {p}%\n"
    )
    out = _run(cluster, script)
    assert out.returncode == 0 and out.stderr == "", (out.stdout, out.stderr)
    dump = out.stdout
    assert dump.startswith("PRAGMA foreign_keys=OFF;\nBEGIN TRANSACTION;\n") and dump.endswith("COMMIT;\n")
    assert "sqlite_raftsql" not in dump
    assert "sqlite_sequence" not in dump  # a partial dump leaves AUTOINCREMENT counters alone
    assert f'INSERT INTO "{p}_a"("id","v") VALUES(' in dump  # the generated column is left out

    def rows(conn, sql):
        return [tuple(r) for r in conn.execute(sql).fetchall()]

    queries = [f"SELECT id, v, typeof(v), g FROM {p}_a ORDER BY id",
               f'SELECT k, n, typeof(n), blob, typeof(blob) FROM "{p}_b x" ORDER BY k',
               f"SELECT * FROM {p}_v ORDER BY 1",
               f"SELECT type, name FROM sqlite_schema WHERE name LIKE '{p}%' ORDER BY name"]
    import raftsql.driver as db

    conn = db.connect(cluster.dsn, autocommit=True)
    try:
        want = [rows(conn, q) for q in queries]
        plain = sqlite3.connect(tmp_path / "copy.db")
        plain.executescript(dump)
        assert [rows(plain, q) for q in queries] == want
        plain.close()
        for stmt in (f"DROP VIEW {p}_v", f"DROP TABLE {p}_a", f'DROP TABLE "{p}_b x"'):
            conn.execute(stmt)
        again = _run(cluster, dump)
        assert again.returncode == 0 and again.stderr == "", again.stderr
        assert [rows(conn, q) for q in queries] == want
    finally:
        conn.close()


def test_read_runs_a_file_and_reports_what_it_cannot(cluster, tmp_path):
    t = "read_" + uuid.uuid4().hex[:8]
    inner = tmp_path / "inner.sql"
    inner.write_text(f"INSERT INTO {t} VALUES (2);\nSELECT sum(x) AS s FROM {t};\n")
    outer = tmp_path / "outer.sql"
    outer.write_text(f"CREATE TABLE {t}(x);\nINSERT INTO {t} VALUES (1);\n.read {inner}\n"
                     f"INSERT INTO {t} VALUES (4)\n")  # the file's end ends the statement
    loop = tmp_path / "loop.sql"
    loop.write_text(f".read {loop}\n")
    quits = tmp_path / "quits.sql"
    quits.write_text(".quit\n")
    script = (f".read {outer}\nSELECT sum(x) AS total FROM {t};\n.read {tmp_path / 'missing.sql'}\n"
              f".read {loop}\n.read\n.read '{quits}'\nSELECT 'never runs';\n")
    out = _run(cluster, script)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "s\n-\n3\n" in out.stdout and "total\n-----\n7\n" in out.stdout, out.stdout
    assert "never runs" not in out.stdout
    err = out.stderr
    assert 'cannot open "' in err and "missing.sql" in err, err
    assert "nested more than 16 deep" in err and "Usage: .read FILE" in err, err


def test_a_dsn_with_missing_certificates_is_a_one_line_error(cluster, tmp_path):
    dsn = cluster.dsn.split("?")[0] + f"?certs={tmp_path / 'nonexist'}"
    out = subprocess.run([sys.executable, "-m", "raftsql.cli", "shell", dsn], input="SELECT 1;\n",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("Error: ") and "ca.crt" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_import_output_and_once_as_in_sqlite3(cluster, tmp_path):
    t = "imp_" + uuid.uuid4().hex[:8]
    data = tmp_path / "pets.csv"
    rows = [("Rex", "dog", "3"), ("Tom, the cat", "cat", ""), ('Say "hi"', "parrot", "12")]
    rows += [(f"pet{i}", "fish", str(i)) for i in range(2500)]  # three writes of 1,000 rows
    with open(data, "w", newline="") as f:
        import csv

        w = csv.writer(f)
        w.writerow(["name", "kind", "age"])
        w.writerows(rows)
    ragged = tmp_path / "ragged.txt"
    ragged.write_text("Nemo|fish\nPolly|parrot|1|extra\n")
    quoted = tmp_path / "quoted.txt"  # list mode honours quotes too, as sqlite3's shell does
    quoted.write_text('a|b\n"1|2"|3\n\n""\n')
    dup = tmp_path / "dup.csv"
    dup.write_text("a,a,\n1,2,3\n")
    clash = tmp_path / "clash.csv"  # a row that fails is noted and skipped, as sqlite3 does
    clash.write_text("id,v\n1,a\n2,b\n1,c\n3,d\n")
    huge = tmp_path / "huge.csv"
    huge.write_text("a,b\n1," + "x" * 200000 + "\n")
    bom = tmp_path / "bom.csv"  # as spreadsheets save it: a BOM, CRLF, a field with a line break
    bom.write_bytes("\ufeffa,b\r\n\"x\ny\",1\r\n2\r\n".encode())
    out_file, once_file = tmp_path / "out.csv", tmp_path / "once.txt"
    script = (
        f".import --csv {data} {t}\n"
        f".import {ragged} {t}\n"  # list mode: split at '|'
        ".mode csv\n"
        f".import --skip 1 {data} {t}\n"  # the table exists: every row is data, but the skipped
        f".output {out_file}\n"
        f"SELECT name, kind, age FROM {t} WHERE rowid <= 3 ORDER BY rowid;\n"
        f".tables {t}\n"
        ".output\n"
        ".mode list\n"
        "SELECT 'on the screen';\n"
        f".once {once_file}\n"
        "SELECT 'in the file';\n"
        "SELECT 'on the screen again';\n"
        f"SELECT count(*), count(DISTINCT name), sum(age IS NULL) FROM {t};\n"
        f".import --csv {bom} {t}_bom\n"
        f"SELECT a, b FROM {t}_bom ORDER BY rowid;\n"
        f".import {quoted} '{t} q'\n"
        f"SELECT quote(a), quote(b) FROM \"{t} q\" ORDER BY rowid;\n"
        f".import --csv {dup} {t}_dup\n"
        f"SELECT a_1, a_2, \"?\" FROM {t}_dup;\n"
        f"CREATE TABLE {t}_clash(id INTEGER PRIMARY KEY, v);\n"
        f".import --csv --skip 1 {clash} {t}_clash\n"
        f"SELECT group_concat(v, '') AS clash_rows FROM {t}_clash;\n"
        f".import --csv {huge} {t}_huge\n"
        f"SELECT length(b) FROM {t}_huge;\n"
        f".once {tmp_path / 'o2.txt'}\n"
        f".tables {t}_dup\n"
        "SELECT 'after the dot command';\n"
        f".once {tmp_path / 'o3.txt'}\n"
        "SELECT 'one' AS x; SELECT 'two' AS y;\n"
        f".import {tmp_path / 'missing.csv'} {t}\n"
        f".import --bogus {data} {t}\n"
        ".import onlyfile\n"
        ".output |cat\n"
        ".once\n"
    )
    out = _run(cluster, script)
    assert out.returncode == 1, (out.stdout, out.stderr)
    o, err = out.stdout, out.stderr
    assert out_file.read_bytes().decode() == (
        'name,kind,age\r\nRex,dog,3\r\n"Tom, the cat",cat,\r\n"Say ""hi""",parrot,12\r\n' + t + "\n")
    assert once_file.read_text() == "'in the file'\nin the file\n"
    assert "on the screen\n" in o and "on the screen again\n" in o and "in the file" not in o, o
    # 2,503 rows twice, and the two ragged ones; NULL only where a field was missing (an empty
    # CSV field is an empty string, as in sqlite3).
    assert f"{2 * 2503 + 2}|2505|1\n" in o, o
    assert "ragged.txt:1: expected 3 columns but found 2 - filling the rest with NULL" in err, err
    assert "ragged.txt:2: expected 3 columns but found 4 - extras ignored" in err, err
    assert "x\ny|1\n2|\n" in o, o  # the header named a and b (no BOM), b NULL in the short row
    assert "bom.csv:4: expected 2 columns but found 1" in err, err
    # A quoted field holds the separator; an empty line and "" are each one empty value.
    assert "quote(a)|quote(b)\n'1|2'|'3'\n''|NULL\n''|NULL\n" in o, o
    assert "quoted.txt:3: expected 2 columns but found 1" in err, err
    assert "a_1|a_2|?\n1|2|3\n" in o, o  # duplicate and empty header names, as sqlite3 names them
    assert "length(b)\n200000\n" in o, o  # past csv's default 128 KiB field limit
    assert "clash_rows\nabd\n" in o, o
    assert "clash.csv:4: INSERT failed: UNIQUE constraint failed" in err, err
    assert (tmp_path / "o2.txt").read_text() == f"{t}_dup\n"
    assert "after the dot command" in o, o
    assert (tmp_path / "o3.txt").read_text() == "x\none\ny\ntwo\n"
    assert 'cannot open "' in err and "missing.csv" in err, err
    assert 'unknown option "--bogus"' in err and err.count("Usage: .import") == 2, err
    assert "pipes to commands are not supported" in err and "Usage: .once FILE" in err, err
