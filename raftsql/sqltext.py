"""SQL text helpers shared by the server and the driver (pure string work, no SQLite).

Only for what text alone can decide (blank input, where a statement ends, which keyword it
starts with). Whether a statement reads or writes is SQLite's decision, never made here.
"""

from __future__ import annotations

import functools


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


def identifiers(sql: str) -> set[str]:
    """Every name-like token of the text, lower-cased: bare words and quoted identifiers
    ("x", `x`, [x]), with string literals, blob literals and comments skipped. Keywords are
    included, so callers intersect it with the names they look for (an over-approximation:
    a column named like a view counts as that view)."""
    out: set[str] = set()
    n = len(sql)
    i = 0
    while i < n:
        c = sql[i]
        if c == "'":
            j = i + 1
            while True:
                j = sql.find("'", j)
                if j < 0 or not sql.startswith("''", j):
                    break
                j += 2
            i = n if j < 0 else j + 1
        elif c in _QUOTES:
            close = _QUOTES[c]
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
            out.add("".join(parts).lower())
            i = j
        elif c == "-" and sql.startswith("--", i) or c == "/" and sql.startswith("/*", i):
            i = skip_blank(sql, i)
        elif c.isalpha() or c == "_" or ord(c) > 127:
            j = i + 1
            while j < n and (sql[j].isalnum() or sql[j] in "_$" or ord(sql[j]) > 127):
                j += 1
            out.add(sql[i:j].lower())
            i = j
        elif c.isdigit():
            j = i + 1
            while j < n and (sql[j].isalnum() or sql[j] == "."):
                j += 1
            i = j
        else:
            i += 1
    return out
