"""pytest plugin for the inner run of SQLAlchemy's dialect compliance suite (loaded with
`-p raftsql_suite_plugin` from pytest.ini in this directory; tests/sqlalchemy/test_dialect_suite.py
starts that run in a subprocess). It is SQLAlchemy's own pytest plugin, plus the provisioning
hooks of the "raftsql" backend name: a raftsql:// URL's backend is "raftsql" while its
dialect's name is "sqlite", so SQLite's file-based provisioning (ATTACH test_schema) is not used."""

from __future__ import annotations

import pytest
from sqlalchemy.dialects import registry
from sqlalchemy.testing import provision

registry.register("raftsql", "raftsql.sqla_dialect", "RaftSQLDialect")
pytest.register_assert_rewrite("sqlalchemy.testing.assertions")

from sqlalchemy.testing.plugin.pytestplugin import *  # noqa: E402,F403 - SQLAlchemy's plugin hooks


@provision.create_db.for_db("raftsql")
def _create_db(cfg, eng, ident):
    pass  # one cluster per run, started by the outer test


@provision.drop_db.for_db("raftsql")
def _drop_db(cfg, eng, ident):
    pass  # the outer test stops the cluster and deletes its directory


@provision.stop_test_class_outside_fixtures.for_db("raftsql")
def _stop_test_class(config, db, cls):
    db.dispose()


@provision.temp_table_keyword_args.for_db("raftsql")
def _temp_table_keyword_args(cfg, eng):
    return {"prefixes": ["TEMPORARY"]}


@provision.upsert.for_db("raftsql")
def _upsert(cfg, table, returning, *, set_lambda=None, sort_by_parameter_order=False,
            index_elements=None):
    from sqlalchemy.dialects.sqlite import insert

    stmt = insert(table)
    if set_lambda:
        stmt = stmt.on_conflict_do_update(set_=set_lambda(stmt.excluded))
    else:
        stmt = stmt.on_conflict_do_nothing()
    return stmt.returning(*returning, sort_by_parameter_order=sort_by_parameter_order)


@provision.generate_driver_url.for_db("raftsql")
def _generate_driver_url(url, driver, query_str):
    return url if driver == "raftsql" else None  # "raftsql://" already names its only driver
