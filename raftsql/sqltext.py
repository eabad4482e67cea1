"""SQL text helpers shared by the server and the driver (pure string work, no SQLite).

Only for what text alone can decide (blank input, where a statement ends, which keyword it
starts with). Whether a statement reads or writes is SQLite's decision, never made here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator


def skip_blank(sql: str, i: int = 0, semicolons: bool = True) -> int:
    """Index of the first character at or after i that is not whitespace, ';' or a comment.
    semicolons=False: a ';' is not blank (sqlite3's test for a second statement)."""
    n = len(sql)
    while i < n:
        c = sql[i]
        if c.isspace() or (c == ";" and semicolons):
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


# Statements by their first keyword: those that may be a read (a transaction's preview on a reader
# connection, a streamed result), and those that cannot write at all.
READ_KEYWORDS = frozenset({"SELECT", "VALUES", "WITH", "PRAGMA", "EXPLAIN"})
CANNOT_WRITE_KEYWORDS = frozenset({"SELECT", "VALUES"})

# Texts up to this long are remembered by the caches keyed by SQL text (first_keyword here, the
# node's memories of statements): a cache of 4,096 texts of 4 MiB each held 16 GiB per node.
MAX_CACHED_SQL = 4096


def first_keyword(sql: str) -> str:
    """The statement's first keyword, upper-cased (cached for short texts: batches repeat one
    statement)."""
    if len(sql) > MAX_CACHED_SQL:
        return _first_keyword(sql)
    return _first_keyword_cached(sql)


def _first_keyword(sql: str) -> str:
    i = skip_blank(sql)
    j = i
    n = len(sql)
    while j < n and (sql[j].isalnum() or sql[j] == "_"):
        j += 1
    return sql[i:j].upper()


_first_keyword_cached = functools.lru_cache(maxsize=4096)(_first_keyword)



_QUOTES = {'"': '"', "`": "`", "[": "]"}
_SQL_SPACE = frozenset(" \t\n\f\r")


def tokens(sql: str) -> Iterator[tuple[str, str]]:
    """The text's tokens as (kind, text): kind "name" (a bare word or a quoted identifier, its
    text unquoted and lower-cased), "string" (a string or blob literal), "number", or "punct"
    (one character). Whitespace and comments are skipped. Enough to find names and
    parentheses; not a parser."""
    n = len(sql)
    i = 0
    while i < n:
        c = sql[i]
        if c in _SQL_SPACE:  # SQLite's white space only: U+00A0 is part of a name there
            i += 1
        elif c == "-" and sql.startswith("--", i) or c == "/" and sql.startswith("/*", i):
            i = max(skip_blank(sql, i, semicolons=False), i + 1)
        elif c == "'" or c in _QUOTES:
            close = "'" if c == "'" else _QUOTES[c]
            j, parts = i + 1, []
            while True:
                k = sql.find(close, j)
                if k < 0:
                    parts.append(sql[j:])
                    j = n
                    break
                parts.append(sql[j:k])
                if close != "]" and sql.startswith(close * 2, k):
                    parts.append(close)
                    j = k + 2
                    continue
                j = k + 1
                break
            yield ("string" if c == "'" else "name"), "".join(parts).lower()
            i = j
        elif c.isalpha() or c == "_" or ord(c) > 127:
            j = i + 1
            while j < n and (sql[j].isalnum() or sql[j] in "_$" or ord(sql[j]) > 127):
                j += 1
            if j < n and sql[j] == "'" and sql[i:j] in ("x", "X"):
                i = j  # X'..': a blob literal, read next as a string
                continue
            yield "name", sql[i:j].lower()
            i = j
        elif c.isdigit() or c == "." and i + 1 < n and sql[i + 1].isdigit():
            j = i + 1
            while j < n and (sql[j].isalnum() or sql[j] == "."):
                j += 1
            yield "number", sql[i:j]
            i = j
        else:
            yield "punct", c
            i += 1


def identifiers(sql: str) -> set[str]:
    """Every name-like token of the text, lower-cased, string literals included (SQLite takes
    `FROM 'v1'` as a name), and keywords too: callers intersect it with the names they look
    for, an over-approximation (a column or a string equal to a view's name counts as it)."""
    return {text for kind, text in tokens(sql) if kind in ("name", "string")}


def generated_column_reads(create_table: str) -> dict[str, set[str]]:
    """For a CREATE TABLE text (a statement, or a table's text in sqlite_schema): which
    generated columns each generated column's definition names. A generated column is one
    whose definition has `AS (` (a CAST's AS is followed by a type name). Text only, and an
    over-approximation (any name or string in the column's definition that is a generated
    column counts)."""
    columns: list[list[tuple[str, str]]] = []
    depth = 0
    column: list[tuple[str, str]] = []
    for kind, text in tokens(create_table):
        if kind == "punct" and text == "(":
            depth += 1
            if depth == 1:
                continue
        elif kind == "punct" and text == ")":
            depth -= 1
            if depth == 0:
                break
        if depth == 1 and kind == "punct" and text == ",":
            columns.append(column)
            column = []
        elif depth >= 1:
            column.append((kind, text))
    columns.append(column)
    generated = {c[0][1] for c in columns if c and c[0][0] == "name" and any(
        a == ("name", "as") and b == ("punct", "(") for a, b in zip(c, c[1:], strict=False))}
    out: dict[str, set[str]] = {}
    for c in columns:
        if c and c[0][1] in generated:
            names = {text for kind, text in c[1:] if kind in ("name", "string")}
            out[c[0][1]] = names & generated - {c[0][1]}
    return out
