"""`raftsql backup` of a live cluster under writes, and `raftsql restore` into a new cluster
(real node processes, the real CLI, the sqlite3 module and, when installed, the sqlite3 CLI)."""

import re
import shutil
import sqlite3
import subprocess
import sys
import threading

import pytest

from raftsql.testing.cluster import LocalCluster, running


def _cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "raftsql.cli", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


@pytest.fixture
def cluster(tmp_path):
    with running(tmp_path / "a", 3) as c:
        yield c


def test_backup_of_a_live_cluster_matches_its_content_at_its_index(cluster, tmp_path):
    c = cluster.client(timeout=20)
    c.execute([("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER, pad BLOB)", [])])
    acked: dict[int, int] = {}  # v -> the log index of its write
    stop = threading.Event()
    started = threading.Event()
    errors = []

    def writer():
        wc = cluster.client(timeout=20)
        try:
            v = 0
            while not stop.is_set():
                r = wc.execute([("INSERT INTO t (v, pad) VALUES (?, randomblob(200))", [v])])
                assert r["error"] is None, r
                acked[v] = r["index"]
                v += 1
                if v == 100:
                    started.set()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            started.set()
        finally:
            wc.close()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        assert started.wait(60)
        before = dict(acked)  # acknowledged before the backup began: all must be in it
        out = tmp_path / "out.db"
        p = _cli("backup", cluster.admin_dsn, str(out))
        after = len(acked)
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    m = re.search(r"at index (\d+)", p.stdout)
    assert m, p.stdout
    index = int(m.group(1))
    assert len(acked) > after or after > len(before)  # writes ran during the backup
    db = sqlite3.connect(f"file:{out}?mode=ro", uri=True)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT applied_index FROM sqlite_raftsql_meta").fetchone()[0] == index
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
    assert "t" in names and all(n == "t" or n.startswith("sqlite_raftsql_") for n in names)
    # Sessions and transaction bookkeeping are emptied; user listings skip sqlite_* tables.
    assert db.execute("SELECT count(*) FROM sqlite_raftsql_sessions").fetchone() == (0,)
    assert [line for line in db.iterdump() if "raftsql" in line] == []
    rows = [r[0] for r in db.execute("SELECT v FROM t ORDER BY id")]
    db.close()
    # Exactly the writes at or below the backup's index, each once.
    assert rows == sorted(v for v, i in acked.items() if i <= index)
    assert set(before) <= set(rows)
    assert any(i > index for i in acked.values())  # and it is a cut: later writes are not in it
    if shutil.which("sqlite3"):
        cli = subprocess.run(["sqlite3", "-readonly", str(out), "SELECT count(*), max(v) FROM t;"],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.strip() == f"{len(rows)}|{max(rows)}"


def test_backup_errors(cluster, tmp_path):
    p = _cli("backup", cluster.admin_dsn, str(tmp_path), check=False)
    assert p.returncode == 2 and "is a directory" in p.stderr
    p = _cli("backup", cluster.admin_dsn, str(tmp_path / "missing" / "out.db"), check=False)
    assert p.returncode == 1 and f"{tmp_path / 'missing'} is not a directory" in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "a"]  # no temp file left behind


def _content(db_rows_fn):
    out = {}
    for table, sql in (("items", "SELECT rowid, * FROM items ORDER BY rowid"),
                       ("kv", "SELECT * FROM kv ORDER BY k"),
                       ("auto", "SELECT * FROM auto ORDER BY id"),
                       ("v_items", "SELECT * FROM v_items ORDER BY 1"),
                       ("log", "SELECT * FROM log ORDER BY 1"),
                       ("schema", "SELECT type, name, sql FROM sqlite_schema WHERE name NOT LIKE '\\_raftsql\\_%' "
                                  "ESCAPE '\\' ORDER BY type, name"),
                       ("user_version", "PRAGMA user_version")):
        out[table] = [tuple(r) for r in db_rows_fn(sql)]
    return out


def test_restore_round_trip(cluster, tmp_path):
    c = cluster.client(timeout=20)
    setup = [
        "CREATE TABLE items (name TEXT, price REAL, data BLOB, note)",
        "CREATE TABLE kv (k TEXT PRIMARY KEY, v) WITHOUT ROWID",
        "CREATE TABLE auto (id INTEGER PRIMARY KEY AUTOINCREMENT, x, doubled GENERATED ALWAYS AS (x * 2))",
        "CREATE TABLE log (msg TEXT)",
        "CREATE INDEX items_price ON items (price)",
        "CREATE VIEW v_items AS SELECT name, price FROM items WHERE price > 1",
        "CREATE TRIGGER items_log AFTER INSERT ON items BEGIN INSERT INTO log VALUES ('added ' || new.name); END",
        "PRAGMA user_version = 42",
    ]
    for sql in setup:
        assert c.execute([(sql, [])])["error"] is None, sql
    for i in range(300):
        c.execute([("INSERT INTO items VALUES (?, ?, ?, ?)", [f"n{i}", i * 0.5, bytes([i % 256]) * (i % 7), None if i % 3 else i])])
    c.execute([("DELETE FROM items WHERE rowid % 10 = 0", [])])  # rowid gaps must survive
    for i in range(50):
        c.execute([("INSERT INTO kv VALUES (?, ?)", [f"k{i:03d}", "x" * i])])
        c.execute([("INSERT INTO auto (x) VALUES (?)", [i])])
    c.close()
    backup = tmp_path / "b.db"
    _cli("backup", cluster.admin_dsn, str(backup))
    src = sqlite3.connect(backup)
    want = _content(lambda sql: src.execute(sql).fetchall())
    src.close()
    assert len(want["items"]) == 270 and len(want["log"]) == 300 and want["user_version"] == [(42,)]

    with LocalCluster(tmp_path / "b", 3) as new:
        new.start()
        new.wait_leader()
        p = _cli("restore", str(backup), new.admin_dsn)
        assert "restored 4 tables, 670 rows" in p.stdout, p.stdout
        nc = new.client(timeout=20)
        got = _content(lambda sql: [tuple(r) for r in nc.execute([(sql, [])])["rows"]])
        assert got == want
        # The trigger is restored, after the rows (it did not fire while they were loaded).
        nc.execute([("INSERT INTO items VALUES ('new', 9, NULL, NULL)", [])])
        assert nc.execute([("SELECT count(*) FROM log", [])])["rows"] == [[301]]
        nc.close()
        # A second restore into a cluster with tables is refused.
        p = _cli("restore", str(backup), new.admin_dsn, check=False)
        assert p.returncode == 1 and "not empty" in p.stderr and "never finished" not in p.stderr
        # One that began and never ended (interrupted) is named as the reason.
        admin = new.client(certs=new.admin_certs, timeout=20)
        admin._call({"op": "restore_begin", "source": "other.db", "timeout_ms": 5000}, 10, None)
        admin.close()
        p = _cli("restore", str(backup), new.admin_dsn, check=False)
        assert p.returncode == 1 and "A restore of other.db began at log index" in p.stderr, p.stderr
        assert "never finished" in p.stderr
        # Every node, and a node that joins later, holds the same database.
        new.add_node("n4")
        new.start("n4")
        hashes = new.hashes(timeout=60)
        assert len(hashes) == 4 and len(set(hashes.values())) == 1, hashes


def test_restore_refuses_what_is_not_a_database(cluster, tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)
    p = _cli("restore", str(junk), cluster.admin_dsn, check=False)
    assert p.returncode == 1 and "not a readable SQLite database" in p.stderr, p.stderr


def test_restore_refuses_a_row_over_the_request_limit_before_writing_anything(cluster, tmp_path):
    """A 5 MB row (accepted by the cluster as one statement with randomblob) cannot travel in
    one 4 MiB request: the restore says so before it writes, and the cluster stays empty, so
    a restore with larger limits can follow."""
    src = tmp_path / "big.db"
    with sqlite3.connect(src) as db:
        db.execute("CREATE TABLE small (x)")
        db.execute("INSERT INTO small VALUES (1)")
        db.execute("CREATE TABLE big (b BLOB)")
        db.execute("INSERT INTO big VALUES (zeroblob(5000000))")
    p = _cli("restore", str(src), cluster.admin_dsn, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "table 'big' has a row of about 5000000 bytes" in p.stderr and "nothing was restored" in p.stderr
    c = cluster.client(timeout=20)
    names = [r[0] for r in c.execute([("SELECT name FROM sqlite_schema", [])])["rows"]]
    c.close()
    assert [n for n in names if not n.startswith("sqlite_")] == []


def test_a_restore_that_a_client_write_breaks_says_what_is_left(cluster, tmp_path):
    """A client writing into the new cluster during a restore can make a restored row collide:
    the restore stops, and its error says that part of the backup is in the cluster and what
    to do (it used to name only the failed statement)."""
    from raftsql.driver import _admin

    src = tmp_path / "rows.db"
    with sqlite3.connect(src) as db:
        db.execute("CREATE TABLE w (id INTEGER PRIMARY KEY, body TEXT)")
        db.executemany("INSERT INTO w VALUES (?, ?)", [(i, "x" * 100) for i in range(1, 301)])
    intruder = cluster.client(timeout=20)

    def progress(table, rows):
        if rows < 200:  # after the first batches: a row the restore has not sent yet
            intruder.execute([("INSERT INTO w VALUES (300, 'intruder')", [])])

    try:
        with pytest.raises(_admin.AdminError, match="UNIQUE") as info:
            _admin.restore(cluster.admin_dsn, str(src), batch_bytes=4096, progress=progress)
    finally:
        intruder.close()
    assert "stopped halfway" in str(info.value) and "Start a new, empty cluster" in str(info.value)
