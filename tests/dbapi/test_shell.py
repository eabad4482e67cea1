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
        os.write(master, b"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                         b"SELECT count(*) FROM c;\n")
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
