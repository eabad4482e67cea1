"""Hostile client, statements that SQLite flattens into one deep expression: views, CTEs and
FROM-clause subqueries stacked on each other. Each level may hold an expression up to SQLite's
depth limit (1,000), and flattening stacks them without checking that limit again: preparing
such a statement overflowed the C stack and the node exited with a segmentation fault (every
node, for a write). The sandbox now bounds the stacked depth (server/sandbox.py,
prepare_bounded), and each test checks afterwards that every node is alive, that no election
happened and that all databases hash equal (the `guard` fixture)."""

import pytest

import raftsql.driver as raftsql


def deep(term: str, depth: int) -> str:
    return "(" * depth + term + "+1)" * depth


def cte_chain(levels: int, depth: int) -> str:
    parts, prev = [], "base"
    for i in range(levels):
        parts.append(f"c{i} AS (SELECT {deep('x', depth)} AS x FROM {prev})")
        prev = f"c{i}"
    return "WITH " + ", ".join(parts) + f" SELECT x FROM {prev}"


@pytest.fixture(scope="module")
def conn(base_conn):
    return base_conn


def too_complex(info) -> bool:
    return "too complex" in str(info.value)


def test_a_chain_of_views_written_by_one_script_is_refused_and_no_node_falls(cluster, conn, guard):
    # The repro of 2026-12-05: 20 views of depth 900, then one executescript with an INSERT
    # reading the last; all three nodes exited with signal 11.
    with guard():
        prev = "base"
        for i in range(20):
            conn.execute(f"CREATE VIEW v{i} AS SELECT {deep('x', 900)} AS x FROM {prev}")
            prev = f"v{i}"
        with pytest.raises(raftsql.DatabaseError) as info:
            conn.executescript("INSERT INTO sink SELECT x FROM v19;")
        assert too_complex(info)
        with pytest.raises(raftsql.DatabaseError) as info:
            conn.execute("SELECT x FROM v19").fetchall()
        assert too_complex(info)
        # Fifteen such views still work, for reads and writes alike (16 SELECTs).
        assert conn.execute("SELECT x FROM v14").fetchall() == [(15 * 900,)]
        conn.execute("INSERT INTO sink SELECT x FROM v14")
    assert conn.execute("SELECT x FROM sink").fetchall() == [(15 * 900,)]


def test_a_read_of_a_cte_chain_is_refused_and_its_node_lives(cluster, conn, guard):
    # Needs no write right: one read of 20 CTEs of depth 900 crashed the node serving it.
    with guard():
        with pytest.raises(raftsql.DatabaseError) as info:
            conn.execute(cte_chain(20, 900)).fetchall()
        assert too_complex(info)
        with pytest.raises(raftsql.DatabaseError) as info:
            conn.execute("INSERT INTO sink " + cte_chain(200, 90))
        assert too_complex(info)


def test_many_shallow_selects_and_one_deep_expression_still_work(cluster, conn, guard):
    with guard():
        # More than 16 SELECTs, every expression shallow: prepared again under the lower depth.
        union = " UNION ALL ".join(f"SELECT {i}" for i in range(40))
        assert len(conn.execute(union).fetchall()) == 40
        assert conn.execute(cte_chain(60, 50)).fetchall() == [(3000,)]
        # One expression near SQLite's own limit, few SELECTs: as in sqlite3.
        assert conn.execute(f"SELECT {deep('x', 990)} FROM base").fetchall() == [(990,)]
        ors = " OR ".join(f"x = {i}" for i in range(1, 900))
        conn.execute(f"INSERT INTO sink SELECT 7 FROM base WHERE NOT ({ors})")
        assert conn.execute("SELECT count(*) FROM sink WHERE x = 7").fetchone() == (1,)
        # Both at once is what is refused.
        with pytest.raises(raftsql.DatabaseError) as info:
            conn.execute(f"{union} UNION ALL SELECT {deep('1', 300)}").fetchall()
        assert too_complex(info)


def test_a_chain_of_generated_columns_is_refused_and_no_node_falls(cluster, conn, guard):
    # Generated columns reading each other are coded inside one another: 200 of depth 90
    # overflowed an 8 MB stack, and 300 of depth 900 took 205 s to end out of memory even on
    # the node's 256 MiB stack (server/DESIGN.md, "Flattening"). Refused when created.
    cols = ", ".join(f"g{i} AS ({deep(f'g{i - 1}', 90)})" for i in range(1, 201))
    with guard():
        with pytest.raises(raftsql.DatabaseError) as info:
            conn.execute(f"CREATE TABLE gen(g0, {cols})")
        assert "generated columns nested too deep" in str(info.value)
        with pytest.raises(raftsql.DatabaseError):
            conn.execute("INSERT INTO gen(g0) VALUES (1)")  # no such table
