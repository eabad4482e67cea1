"""An Alembic migration on raftsql://: create a table, add a column, add an index, then
downgrade (batch mode, SQLite's way to drop a column), against a real cluster; after each
step every node has the same schema (read from each node itself) and the same content hash."""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("alembic")
sa = pytest.importorskip("sqlalchemy")

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402

import raftsql.driver as db  # noqa: E402

ENV_PY = '''
from alembic import context
from sqlalchemy import create_engine

engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
'''

REVISIONS = {
    "0001_account.py": '''
        revision = "0001"
        down_revision = None
        from alembic import op
        import sqlalchemy as sa

        def upgrade():
            op.create_table(
                "account",
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("name", sa.String(50), nullable=False),
            )

        def downgrade():
            op.drop_table("account")
    ''',
    "0002_email.py": '''
        revision = "0002"
        down_revision = "0001"
        from alembic import op
        import sqlalchemy as sa

        def upgrade():
            op.add_column("account", sa.Column("email", sa.String(100)))
            op.create_index("ix_account_email", "account", ["email"], unique=True)

        def downgrade():
            op.drop_index("ix_account_email", table_name="account")
            with op.batch_alter_table("account") as batch:
                batch.drop_column("email")
    ''',
}


def _schemas(cluster) -> dict[str, list[tuple]]:
    """Each node's own schema (a stale read served by that node alone)."""
    out = {}
    for nid in cluster.ids:
        conn = db.connect(cluster.dsn, hosts=[cluster.address(nid)], discover=False,
                          consistency="stale", timeout=20)
        try:
            out[nid] = conn.execute(
                "SELECT type, name, tbl_name, sql FROM sqlite_master "
                "WHERE name NOT LIKE 'sqlite%' AND tbl_name IN ('account', 'alembic_version') "
                "ORDER BY type, name").fetchall()
        finally:
            conn.close()
    return out


def _same_everywhere(cluster) -> list[tuple]:
    hashes = cluster.hashes(timeout=30)  # waits until every node applied the same index
    assert len(set(hashes.values())) == 1, hashes
    schemas = _schemas(cluster)
    first = schemas[cluster.ids[0]]
    assert all(s == first for s in schemas.values()), schemas
    return first


def test_alembic_upgrade_and_downgrade(sa_cluster, tmp_path):
    from raftsql.sqla_dialect import sqlalchemy_url

    scripts = tmp_path / "migrations"
    (scripts / "versions").mkdir(parents=True)
    (scripts / "env.py").write_text(ENV_PY)
    (scripts / "script.py.mako").write_text("")
    for name, body in REVISIONS.items():
        (scripts / "versions" / name).write_text(textwrap.dedent(body))
    cfg = Config()
    cfg.set_main_option("script_location", str(scripts))
    url = sqlalchemy_url(sa_cluster.dsn, timeout="30").render_as_string(hide_password=False)
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))

    command.upgrade(cfg, "head")
    schema = _same_everywhere(sa_cluster)
    names = {(t, n) for t, n, _, _ in schema}
    assert {("table", "account"), ("table", "alembic_version"), ("index", "ix_account_email")} <= names
    account_sql = next(sql for t, n, _, sql in schema if n == "account")
    assert "email VARCHAR(100)" in account_sql

    engine = sa.create_engine(url)
    try:
        with engine.begin() as c:
            c.execute(sa.text("INSERT INTO account (name, email) VALUES ('ann', 'ann@example.org')"))
            assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0002"
    finally:
        engine.dispose()

    command.downgrade(cfg, "0001")
    schema = _same_everywhere(sa_cluster)
    account_sql = next(sql for t, n, _, sql in schema if n == "account")
    assert "email" not in account_sql and ("index", "ix_account_email") not in {(t, n) for t, n, _, _ in schema}
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:  # the row survived the batch copy of the table
            assert c.execute(sa.text("SELECT name FROM account")).all() == [("ann",)]
    finally:
        engine.dispose()

    command.downgrade(cfg, "base")
    schema = _same_everywhere(sa_cluster)
    assert [n for _, n, _, _ in schema] == ["alembic_version"]
