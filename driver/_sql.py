"""SQL text helpers: a statement's first keyword and main verb, and splitting a script into
statements."""

from __future__ import annotations

import functools
import re

from raftsql.sqltext import MAX_CACHED_SQL, first_keyword, skip_blank  # noqa: F401 - re-exported

# The statements sqlite3's legacy transaction control opens a transaction before (CPython's
# Modules/_sqlite/statement.c: the first word after blanks and comments, nothing else).
_DML = frozenset({"INSERT", "UPDATE", "DELETE", "REPLACE"})
# What can follow a WITH clause: a SELECT (or VALUES) reads; the others write.
_VERBS = frozenset({"SELECT", "VALUES", *_DML})


def is_dml(sql: str) -> bool:
    """True if sqlite3's legacy transaction control would open a transaction before this
    statement: it starts with INSERT, UPDATE, DELETE or REPLACE (a WITH ... INSERT does not,
    in sqlite3 either)."""
    return first_keyword(sql) in _DML


def statement_verb(sql: str) -> str:
    """The statement's main keyword: its first one, or for `WITH ...` the SELECT, VALUES,
    INSERT, UPDATE, DELETE or REPLACE that follows the common table expressions ("WITH" if none
    is found). In SQLite a CTE's body can only be a SELECT, so this word decides whether a WITH
    statement can write."""
    kw = first_keyword(sql)
    if kw != "WITH":
        return kw
    i, n, depth = skip_blank(sql) + 4, len(sql), 0
    while i < n:
        c = sql[i]
        if c in "'\"`":
            # A string or quoted name; a doubled quote is an escaped one.
            j = i + 1
            while True:
                j = sql.find(c, j)
                if j < 0 or not sql.startswith(c, j + 1):
                    break
                j += 2
            i = n if j < 0 else j + 1
        elif c == "[":
            j = sql.find("]", i + 1)
            i = n if j < 0 else j + 1
        elif c == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif c == "/" and sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == "(":
            depth += 1
            i += 1
        elif c == ")":
            depth -= 1
            i += 1
        elif c == ";":
            break
        elif c.isalnum() or c in "_$:@?#" or c > "\x7f":
            # A word: a keyword or name, a number, or a parameter (:name, @name, $name, ?1).
            j = i + 1
            while j < n and (sql[j].isalnum() or sql[j] in "_$" or sql[j] > "\x7f"):
                j += 1
            word = sql[i:j].upper()
            if depth == 0 and word in _VERBS:
                return word
            i = j
        else:
            i += 1
    return "WITH"


def is_read_only(sql: str) -> bool:
    """True if the statement certainly only reads: its main verb (see statement_verb) is SELECT
    or VALUES, so `WITH ... SELECT` is one (SQLite has no SELECT that writes). The driver uses it
    only to know, before sending, what a lost response means: a read applied nothing. Other
    read-only statements (PRAGMA table_info, EXPLAIN) are not recognized: False means "may
    write", and the server still decides by preparing the statement."""
    return statement_verb(sql) in ("SELECT", "VALUES")


def is_blank(sql: str) -> bool:
    """True if sql holds only whitespace, comments and semicolons."""
    return skip_blank(sql) >= len(sql)


_TXN_CONTROL = re.compile(
    r"(BEGIN(\s+(DEFERRED|IMMEDIATE|EXCLUSIVE))?|COMMIT|END)(\s+TRANSACTION)?\s*;?\s*", re.I
)


def is_begin_or_commit(statement: str) -> bool:
    return _TXN_CONTROL.fullmatch(statement[skip_blank(statement):]) is not None


_TOKEN = re.compile(r"""[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*|"(?:[^"]|"")*"|\[[^\]]*\]|`(?:[^`]|``)*`|'(?:[^']|'')*'""")
_CONTROL_KEYWORDS = frozenset({"BEGIN", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE"})


class MultipleStatements(ValueError):
    """Raised by transaction_control() when more statements follow the first."""


_SPACE = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?(?:\*/|$))*", re.S)


def _tokens(sql: str) -> list[str]:
    out: list[str] = []
    pos = _SPACE.match(sql).end()
    while pos < len(sql):
        if sql[pos] == ";":
            if skip_blank(sql, pos + 1) < len(sql):
                raise MultipleStatements("You can only execute one statement at a time.")
            break
        m = _TOKEN.match(sql, pos)
        if m is None:
            raise ValueError(sql[pos:pos + 20])
        out.append(m.group())
        pos = _SPACE.match(sql, m.end()).end()
    return out


# What can hide a ':' or '@' that is not a parameter: strings, quoted names, comments.
_PARAM_SCAN = re.compile(
    r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|\[[^\]]*\]|`(?:[^`]|``)*`|--[^\n]*|/\*.*?(?:\*/|$)"""
    r"""|(?P<p>[:@$][A-Za-z0-9_\x80-\U0010ffff]+)""", re.S)


def named_parameters(sql: str) -> tuple[str, ...] | None:
    """The names (without :, @ or $) of the named parameters in sql, in order, each once; None
    if the text may hold names this scan does not understand (Tcl-style $a::b(c)). Cached by
    text (short texts only, so the cache stays small): a statement run again with a mapping is
    not scanned again."""
    if len(sql) > MAX_CACHED_SQL:
        return _named_parameters(sql)
    return _named_parameters_cached(sql)


def _named_parameters(sql: str) -> tuple[str, ...] | None:
    if "::" in sql or "$" in sql and "(" in sql:
        return None
    names: dict[str, None] = {}
    for m in _PARAM_SCAN.finditer(sql):
        name = m.group("p")
        if name is not None:
            names[name[1:]] = None
    return tuple(names)


_named_parameters_cached = functools.lru_cache(maxsize=256)(_named_parameters)


def _ident(token: str) -> str:
    """A savepoint name, unquoted (compare them with savepoint_key)."""
    if token[0] in "\"`'":
        token = token[1:-1].replace(token[0] * 2, token[0])
    elif token[0] == "[":
        token = token[1:-1]
    return token


# Per-connection tuning that connect-time recipes set (PRAGMA synchronous=NORMAL, ...): on a
# node they would change one connection of one node (the apply connection's durability, even),
# never the cluster, so the driver answers them itself, as sqlite3 would, and sends nothing.
_TUNING_PRAGMA = re.compile(
    r"\s*PRAGMA\s+(?:main\s*\.\s*)?(synchronous|temp_store|cache_size|mmap_size|busy_timeout|optimize)"
    r"\s*(?:=\s*([^;()]*?)|\(\s*([^;()]*?)\s*\))?\s*;?\s*$", re.I | re.S)


def tuning_pragma(sql: str) -> tuple[str, str | None] | None:
    """(name, value) if sql sets one of the tuning PRAGMAs the driver answers itself (or is
    PRAGMA optimize); None otherwise, reading one's value included (the node answers that)."""
    m = _TUNING_PRAGMA.match(sql)
    if m is None:
        return None
    name, value = m.group(1).lower(), m.group(2) or m.group(3)
    if value is None and name != "optimize":
        return None
    return name, value


def savepoint_key(name: str) -> bytes:
    """SQLite compares savepoint names ASCII case-insensitively (bytes.lower is ASCII only)."""
    return name.encode().lower()


def transaction_control(sql: str) -> tuple[str, str | None] | None:
    """("BEGIN", mode) | ("COMMIT", None) | ("ROLLBACK", None) | ("ROLLBACK_TO", name) |
    ("SAVEPOINT", name) | ("RELEASE", name) for SQLite's transaction statements, None for
    any other statement. Raises ValueError (with the offending text) if it starts like one but
    is not valid SQLite syntax."""
    if first_keyword(sql) not in _CONTROL_KEYWORDS:
        return None
    toks = _tokens(sql)
    words = [t.upper() for t in toks]
    head = words[0]

    def opt_transaction(i: int) -> int:
        # [TRANSACTION [name]] (the name is accepted and ignored by SQLite)
        if i < len(words) and words[i] == "TRANSACTION":
            i += 1
            if i < len(words) and words[i] != "TO":
                i += 1
        return i

    if head == "BEGIN":
        i, mode = 1, "DEFERRED"
        if i < len(words) and words[i] in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
            mode, i = words[i], i + 1
        if opt_transaction(i) == len(words):
            return ("BEGIN", mode)
    elif head in ("COMMIT", "END"):
        if opt_transaction(1) == len(words):
            return ("COMMIT", None)
    elif head == "ROLLBACK":
        i = opt_transaction(1)
        if i == len(words):
            return ("ROLLBACK", None)
        if words[i] == "TO":
            i += 1
            if i < len(words) and words[i] == "SAVEPOINT":
                i += 1
            if i == len(words) - 1:
                return ("ROLLBACK_TO", _ident(toks[i]))
    elif head == "SAVEPOINT":
        if len(words) == 2:
            return ("SAVEPOINT", _ident(toks[1]))
    elif head == "RELEASE":
        i = 2 if len(words) > 2 and words[1] == "SAVEPOINT" else 1
        if i == len(words) - 1:
            return ("RELEASE", _ident(toks[i]))
    raise ValueError(toks[-1] if toks else sql)


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
