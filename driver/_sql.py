"""SQL text helpers: the first keyword of a statement, and splitting a script into statements."""

from __future__ import annotations

import re

from raftsql.sqltext import first_keyword, skip_blank  # noqa: F401 - re-exported


def is_select(sql: str) -> bool:
    """True if the statement certainly only reads: it starts with SELECT or VALUES (SQLite has
    no SELECT that writes). Other read-only statements (WITH ... SELECT, PRAGMA table_info) are
    not recognized; callers must treat False as "may write"."""
    return first_keyword(sql) in ("SELECT", "VALUES")


def is_blank(sql: str) -> bool:
    """True if sql holds only whitespace, comments and semicolons."""
    return skip_blank(sql) >= len(sql)


_TXN_CONTROL = re.compile(
    r"(BEGIN(\s+(DEFERRED|IMMEDIATE|EXCLUSIVE))?|COMMIT|END)(\s+TRANSACTION)?\s*;?\s*", re.I
)


def is_begin_or_commit(statement: str) -> bool:
    return _TXN_CONTROL.fullmatch(statement[skip_blank(statement):]) is not None


def split_script(script: str) -> list[str]:
    """Split a script into complete statements with sqlite3.complete_statement (which knows
    about strings, comments and trigger bodies). A last statement may lack its ';', as in
    sqlite3's executescript. Comment-only pieces are dropped."""
    import sqlite3  # stdlib; lazily, only scripts need it

    statements: list[str] = []
    start = 0
    pos = 0
    while True:
        j = script.find(";", pos)
        if j < 0:
            break
        piece = script[start : j + 1]
        if sqlite3.complete_statement(piece):
            if not is_blank(piece):
                statements.append(piece.strip())
            start = j + 1
        pos = j + 1
    tail = script[start:]
    if not is_blank(tail):
        statements.append(tail.strip())
    return statements
