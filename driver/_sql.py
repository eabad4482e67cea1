"""SQL text helpers: the first keyword of a statement, and splitting a script into statements."""

from __future__ import annotations

import re


def skip_blank(sql: str, i: int = 0) -> int:
    """Index of the first character at or after i that is not whitespace, ';' or a comment."""
    n = len(sql)
    while i < n:
        c = sql[i]
        if c.isspace() or c == ";":
            i += 1
        elif c == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif c == "/" and sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
        else:
            break
    return i


def first_keyword(sql: str) -> str:
    i = skip_blank(sql)
    j = i
    n = len(sql)
    while j < n and (sql[j].isalnum() or sql[j] == "_"):
        j += 1
    return sql[i:j].upper()


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
