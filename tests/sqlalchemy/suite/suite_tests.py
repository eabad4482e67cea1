"""SQLAlchemy's dialect compliance suite, unchanged (run by tests/sqlalchemy/test_dialect_suite.py)."""

from sqlalchemy.testing.suite import *  # noqa: F401,F403
