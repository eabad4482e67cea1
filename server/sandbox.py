"""The SQL sandbox: what a user's statement may do, enforced by an authorizer on every
connection, and the per-connection settings every node pins (server/DESIGN.md, "Sandbox").

A statement may not reach outside the one replicated database file (ATTACH, load_extension,
VACUUM INTO), change per-connection state that would vanish on restart or differ between nodes
(most PRAGMAs, TEMP objects, transaction control), or write raftsql's own tables. The Guard
also records, at prepare time, which tables a statement reads and may write (a transaction's
read and write sets)."""

from __future__ import annotations

import re
from collections.abc import Callable
from itertools import islice
from typing import TypeVar

import apsw

from raftsql.sqltext import MAX_CACHED_SQL, tokens
from raftsql.txncheck import VOLATILE_FUNCTIONS

T = TypeVar("T")

# The progress handler runs every this many VM steps (the apply step budget and the read time
# limit are counted in these units).
PROGRESS_STEPS = 1000
MAX_VALUE_BYTES = 100_000_000  # SQLITE_LIMIT_LENGTH on every connection
BUSY_TIMEOUT_MS = 5000
# SQLite flattens views, CTEs and FROM-clause subqueries into the query that reads them and stacks
# their expressions without checking the depth limit again, so a chain of them overflowed the C
# stack of the thread preparing it (a segmentation fault of the node; server/DESIGN.md,
# "Flattening"). A user statement is first prepared under SQLite's own depth limit
# (FULL_EXPR_DEPTH) with at most SELECT_CAP SELECTs authorized; one that needs more is prepared
# again with every expression and nesting level held to SHALLOW_EXPR_DEPTH, and fails only if it
# needs both. Either way the stacked depth stays near 16,000 levels (about 30 MB of stack at
# the costliest level measured), and node threads get THREAD_STACK_BYTES of stack.
FULL_EXPR_DEPTH = 1000
SHALLOW_EXPR_DEPTH = 100
SELECT_CAP = 16
THREAD_STACK_BYTES = 256 * 1024 * 1024
TOO_COMPLEX = (
    f"the statement is too complex: more than {SELECT_CAP} SELECTs (views, CTEs, subqueries, "
    f"compound terms and trigger bodies count) together with an expression or nesting deeper "
    f"than {SHALLOW_EXPR_DEPTH}"
)
_DEPTH_ERRORS = ("Expression tree is too large", "nested too deep")
# Window functions (OVER) in one statement's text: SQLite's time to prepare grows faster than
# the square of a SELECT's distinct windows (through the sandbox, 300: 0.14 s, 600: 0.48 s; an
# earlier hunt measured over 58 s for 1,000), in one C call no limit stops; as a write, on
# every node's apply thread.
MAX_WINDOWS = 200
TOO_MANY_WINDOWS = (
    f"the statement is too complex: more than {MAX_WINDOWS} window functions (OVER) in its text"
)
_OVER = re.compile(r"(?i)\bover\b")  # (a word: "overdue" costs no tokenizing)
# Views reading views: SQLite works out each view's columns with the authorizer off, in time that
# grows with the square of the chain (200 views of depth 900: 18 s for the first statement after a
# schema change, 1.5 s for each later one). A view may not lie on a chain longer than this.
MAX_VIEW_CHAIN = 32
# Generated columns reading generated columns are coded inside one another, each up to the depth
# limit, with no SELECT to count: a chain of 200 of depth 90 overflowed an 8 MB stack, and 300 of
# depth 900 ran 205 s into SQLITE_NOMEM on 256 MiB. A generated column may not lie on a chain
# longer than this (16 x 1,000 levels, as SELECT_CAP allows).
MAX_GENERATED_CHAIN = 16


def chain_depths(reads: dict[str, list[str]], marked: set[str]) -> tuple[dict[str, int], dict[str, bool]]:
    """For a graph of what reads what (names to sorted names): the length of the longest
    chain from each name, counting itself, and whether some chain from it passes a marked
    name. A name already on the walk's path counts as a leaf (cycles end there)."""
    depth: dict[str, int] = {}
    through: dict[str, bool] = {}
    for top in sorted(reads):
        if top in depth:
            continue
        # Iterative depth-first walk: a chain may be longer than Python's recursion limit.
        stack, on_path = [(top, 0)], {top}
        while stack:
            name, k = stack[-1]
            below = reads.get(name, [])
            if k < len(below):
                stack[-1] = (name, k + 1)
                nxt = below[k]
                if nxt not in depth and nxt not in on_path:
                    stack.append((nxt, 0))
                    on_path.add(nxt)
                continue
            stack.pop()
            on_path.discard(name)
            done = [v for v in below if v in depth]
            depth[name] = 1 + max((depth[v] for v in done), default=0)
            through[name] = name in marked or any(through[v] for v in done)
    return depth, through


# The name under which read and write sets record the schema (and the database header:
# user_version, application_id). Every non-empty read set implicitly includes it.
SCHEMA = "sqlite_schema"
_SCHEMA_NAMES = frozenset({"sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_temp_schema"})


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# ---------------------------------------------------------------------------------------------
# The sandbox

# raftsql's own tables (sqlite_raftsql_meta, ...). Users may read them, never write them.
INTERNAL_PREFIX = "sqlite_raftsql_"
INTERNAL_TABLES = ("meta", "sessions", "tables", "members")
# Their names before they moved under SQLite's reserved prefix; still reserved for user objects.
LEGACY_PREFIX = "_raftsql_"

SESSIONS_TABLE = "sqlite_raftsql_sessions"
# Introspection pragmas: they read the schema and change nothing; their argument (a table name)
# arrives in the value slot, so any argument is fine.
_INTROSPECTION_PRAGMAS = frozenset(
    {
        "table_info",
        "table_xinfo",
        "table_list",
        "index_list",
        "index_info",
        "index_xinfo",
        "foreign_key_list",
        "foreign_key_check",
        "collation_list",
        "function_list",
        "module_list",
        "pragma_list",
        "integrity_check",
        "quick_check",
        "compile_options",
    }
)
# Settings that may be read but not changed (changing them is per connection, not replicated).
# (Not schema_version: it is each file's own counter, and a snapshot copy renumbers it, so a
# write or a transaction's check that read it stored 10 on one node and 1 on a node installed
# from a snapshot. Refused like any other PRAGMA; user_version is replicated.)
_READ_ONLY_SETTINGS = frozenset(
    {"foreign_keys", "recursive_triggers", "encoding", "auto_vacuum", "page_size"}
)
# Of those, the ones pinned OFF on every connection (configure() below), and how SQLite spells
# OFF: setting them OFF is allowed (a no-op).
_PINNED_OFF = frozenset({"foreign_keys", "recursive_triggers"})
_OFF = frozenset({"0", "off", "false", "no"})
# Settings stored in the database header: transactional, replicated like any row.
_WRITABLE_SETTINGS = frozenset({"user_version", "application_id"})
_VTAB_MODULES = frozenset(
    {"fts3", "fts4", "fts5", "fts4aux", "fts5vocab", "rtree", "rtree_i32", "geopoly"}
)
# Virtual tables that expose the physical file (pages, offsets): not replicated state.
_PHYSICAL_TABLES = frozenset({"dbstat", "sqlite_dbpage"})
# The query planner's statistics: SQLite loads them at ANALYZE and when it reads the schema, so
# an edit by hand reached the plans of a node that restarted and not of the others (an INSERT
# ... SELECT ... LIMIT took another row on each). Apply reloads them after an entry that wrote
# them (StateMachine._touch_tables).
STAT_TABLES = frozenset({"sqlite_stat1", "sqlite_stat2", "sqlite_stat3", "sqlite_stat4"})

_A = apsw
_TEMP_ACTIONS = frozenset(
    {
        _A.SQLITE_CREATE_TEMP_INDEX,
        _A.SQLITE_CREATE_TEMP_TABLE,
        _A.SQLITE_CREATE_TEMP_TRIGGER,
        _A.SQLITE_CREATE_TEMP_VIEW,
        _A.SQLITE_DROP_TEMP_INDEX,
        _A.SQLITE_DROP_TEMP_TABLE,
        _A.SQLITE_DROP_TEMP_TRIGGER,
        _A.SQLITE_DROP_TEMP_VIEW,
    }
)
# Schema changes whose object name (arg3) or table (arg4) must not be an internal one.
_SCHEMA_ACTIONS = frozenset(
    {
        _A.SQLITE_CREATE_INDEX,
        _A.SQLITE_CREATE_TABLE,
        _A.SQLITE_CREATE_TRIGGER,
        _A.SQLITE_CREATE_VIEW,
        _A.SQLITE_DROP_INDEX,
        _A.SQLITE_DROP_TABLE,
        _A.SQLITE_DROP_TRIGGER,
        _A.SQLITE_DROP_VIEW,
        _A.SQLITE_ALTER_TABLE,
        _A.SQLITE_CREATE_VTABLE,
        _A.SQLITE_DROP_VTABLE,
    }
)
# Schema actions whose object's chains are checked after the statement (Guard.defined).
_DEFINES = {_A.SQLITE_CREATE_VIEW: "view", _A.SQLITE_ALTER_TABLE: "altered"}
_ROW_WRITES = frozenset({_A.SQLITE_INSERT, _A.SQLITE_UPDATE, _A.SQLITE_DELETE})


def is_internal(name: str | None) -> bool:
    if name is None:
        return False
    low = name.lower()
    return low.startswith(INTERNAL_PREFIX) or low.startswith(LEGACY_PREFIX)


_NO_TEMP = "TEMP objects are not allowed: they belong to one connection and are not replicated"
_TEMP_SCHEMA_UPKEEP = frozenset({_A.SQLITE_READ, _A.SQLITE_UPDATE, _A.SQLITE_DELETE})
_TEMP_SCHEMA_TABLES = frozenset({"sqlite_temp_master", "sqlite_temp_schema", "sqlite_master",
                                 "sqlite_schema"})


def refusal(
    write: bool, action: int, arg3: str | None, arg4: str | None, nested: bool = False,
    db: str | None = None, in_txn: bool = False,
) -> str | None:
    """Why a user statement may not do `action`, or None if it may. `write` selects the rules of
    the apply path (and validate), which also refuse what is fine to read but not replicated.
    `nested`: the statement is being prepared while another one runs (FTS5's own statements).
    `db`: the schema the action is in ("main", "temp"). `in_txn`: a transaction's statement
    (Guard.in_txn)."""
    if action == _A.SQLITE_ANALYZE and in_txn and write:
        return ("ANALYZE cannot run inside a transaction: the statistics it loads would reach "
                "the leader's query planner alone; run it outside one")
    if db == "temp" and not (action == _A.SQLITE_PRAGMA and (
            arg4 is None or (arg3 or "").lower() in _INTROSPECTION_PRAGMAS)) and not (
            action in _TEMP_SCHEMA_UPKEEP and arg3 in _TEMP_SCHEMA_TABLES):
        # Anything in the temp schema but SQLite's own upkeep of its (empty) schema table:
        # `CREATE TABLE temp.x` comes as SQLITE_CREATE_TABLE (not the TEMP code) and a temp
        # trigger on a main table as SQLITE_CREATE_TRIGGER on "main", but each inserts into
        # the temp schema table, in "temp". A temp object lives in one connection of one node:
        # a temp table hid a main table of the same name from every later statement
        # (acknowledged writes went to it and were lost), and a temp trigger fired on one
        # node's writes and not on a restarted one's. (ALTER TABLE ... RENAME reads and updates
        # sqlite_temp_master to rename what temp triggers say: allowed, since there are none.
        # So are PRAGMAs that only read, like `PRAGMA temp.table_info(t)`, which SQLAlchemy's
        # reflection runs after the main one: they describe an empty schema. Setting one, say
        # temp.user_version, would be one node's connection state.)
        return _NO_TEMP
    if action == _A.SQLITE_READ or action == _A.SQLITE_SELECT or action == _A.SQLITE_RECURSIVE:
        if action == _A.SQLITE_READ and (arg3 or "").lower() == SESSIONS_TABLE:
            # Each client's last write result (its RETURNING rows, its rowid): not another
            # client's business. raftsql reads it with the guard off.
            return f"table {SESSIONS_TABLE} holds each client's last result and cannot be read"
        if write and arg3 in _PHYSICAL_TABLES:
            return f"{arg3} describes this node's file layout, which is not replicated"
        if write and arg3 == "pragma_data_version":
            # The table-valued form: its PRAGMA is authorized only when it runs, nested, where
            # FTS5's own data_version reads must pass; refused here, at prepare.
            return "data_version counts per connection and is not replicated"
        return None
    if action in _ROW_WRITES:
        if is_internal(arg3):
            return f"table {arg3} is internal to raftsql and cannot be modified"
        # sqlite_sequence may be written, as in sqlite3 (DROP and RENAME of an AUTOINCREMENT
        # table write it, and so may a user); a statement that leaves a sequence at the
        # largest rowid fails instead (see Guard.sequence_written).
        if arg3 in _PHYSICAL_TABLES:
            return f"{arg3} writes raw database pages"
        return None
    if action == _A.SQLITE_FUNCTION:
        name = (arg4 or "").lower()
        if name == "load_extension":
            return "load_extension() is not allowed"
        if write and name == "total_changes":
            return "total_changes() counts per connection and is not replicated; use changes()"
        return None
    if action == _A.SQLITE_PRAGMA:
        name = (arg3 or "").lower()
        if name in _INTROSPECTION_PRAGMAS or name in _WRITABLE_SETTINGS:
            return None
        if name in _READ_ONLY_SETTINGS:
            # Setting one to the value it is pinned at changes nothing: allowed, so that
            # connect-time recipes (PRAGMA foreign_keys=OFF around a migration) keep working.
            if arg4 is None or (name in _PINNED_OFF and arg4.strip("'\"").lower() in _OFF):
                return None
            if name == "foreign_keys":
                return ("PRAGMA foreign_keys cannot be changed: it stays OFF on every node (raftsql "
                        "does not enforce foreign keys; see the README)")
            return f"PRAGMA {name} cannot be changed"
        if name == "schema_version":
            return ("PRAGMA schema_version is each node's own file counter (a snapshot copy "
                    "renumbers it), not replicated; PRAGMA user_version is")
        if name == "journal_mode" and (arg4 is None or arg4.strip("'\"").lower() == "wal"):
            # Every node's database is in WAL mode: reading it, or asking for WAL, is a no-op
            # (SQLAlchemy's and Django's connect-time recipes ask for it).
            return None
        if name == "data_version" and arg4 is None and (nested or not write):
            # FTS5 reads it internally; its value is per connection, so a user's write may not.
            return None
        return f"PRAGMA {name} is not allowed"
    if action == _A.SQLITE_ATTACH:
        # VACUUM runs an internal ATTACH; validate/apply refuse VACUUM by keyword first.
        return "ATTACH is not allowed: a replicated database is a single file"
    if action == _A.SQLITE_DETACH:
        return "DETACH is not allowed"
    if action == _A.SQLITE_TRANSACTION or action == _A.SQLITE_SAVEPOINT:
        return (
            "transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT, RELEASE) is managed by "
            "raftsql: every write is already one atomic transaction"
        )
    if action in _TEMP_ACTIONS:
        return _NO_TEMP
    if action in _SCHEMA_ACTIONS:
        if is_internal(arg3) or is_internal(arg4):
            return f"names starting with {LEGACY_PREFIX} or {INTERNAL_PREFIX} are reserved for raftsql"
        if action == _A.SQLITE_CREATE_VTABLE and (arg4 or "").lower() not in _VTAB_MODULES:
            return f"virtual table module {arg4} is not allowed"
        return None
    return None  # ANALYZE, REINDEX


class Guard:
    """Per-connection sandbox state read by the authorizer. `internal` is set while the state
    machine runs its own statements (which carry a secret tag, so a user statement can never
    reuse one of them from apsw's statement cache without being authorized)."""

    __slots__ = (
        "write", "internal", "denied", "schema_change", "user_prepare", "reads", "writes",
        "sequence_written", "prepared", "volatile", "schema_epoch", "record", "shadow",
        "in_txn", "selects_left", "capped", "defined",
    )

    def __init__(self, write: bool):
        self.write = write
        self.internal = False
        self.denied: str | None = None
        self.schema_change = False
        # True from the start of a user statement's execute() until its exec trace (prepare
        # done); prepares outside that window are nested in a running statement (vtab internals).
        self.user_prepare = True
        # When not None, the tables user statements read / may write are added (lower case;
        # the schema as SCHEMA). The authorizer runs only at prepare, so statements whose sets
        # are collected must be prepared each time (can_cache=False, ~2 us per statement).
        self.reads: set[str] | None = None
        self.writes: set[str] | None = None
        # Set when a statement inserts or updates sqlite_sequence: apply then checks that no
        # sequence reached the largest rowid, where the next AUTOINCREMENT insert would fail
        # with SQLITE_FULL, an error apply must take for this node's disk being full.
        self.sequence_written = False
        # Reader connections: set by any user prepare (prepared) and by a call of a function
        # that may read randomness or the clock (volatile), views included.
        self.prepared = False
        self.volatile = False
        # Counts the schema changes user statements were prepared for (any phase): with the
        # schema cookie, it names one schema state of this connection (StatementMemo).
        self.schema_epoch = 0
        # When a list: the authorizer calls of the user statement being prepared (before its
        # exec trace) are appended, so a later run of the same text from apsw's statement
        # cache can replay their effects (StatementMemo).
        self.record: list[tuple[int, str | None, str | None]] | None = None
        # Shadow tables of the virtual tables (lower case), never counted as read or written:
        # rtree prepares its statements on them when a connection first uses the table, inside
        # the user's prepare, so a fresh node saw them and a warm one did not. Kept by the
        # owner (StateMachine._shadow_tables); the virtual table itself is what counts.
        self.shadow: frozenset[str] = frozenset()
        # A transaction's statement (a preview on the leader, or its commit's check), where
        # ANALYZE is refused: a preview's statistics would reach the leader's planner and stay
        # there after the preview is rolled back.
        self.in_txn = False
        # While a user statement is prepared by prepare_bounded (until its exec trace): how many
        # more SELECTs may be authorized before SELECT_CAP is passed (None: no cap), and
        # whether it was.
        self.selects_left: int | None = None
        self.capped = False
        # The views the user statement being run creates and the tables it alters, as ("view"
        # or "altered", lower-case name), or None; the owner resets it per statement and
        # checks their chains (StateMachine._check_chains).
        self.defined: set[tuple[str, str]] | None = None

    def __call__(
        self, action: int, arg3: str | None, arg4: str | None, db: str | None, trig: str | None
    ) -> int:
        if self.internal:
            return apsw.SQLITE_OK
        if action == _A.SQLITE_SELECT and self.selects_left is not None:
            self.selects_left -= 1
            if self.selects_left < 0:
                self.capped = True
                return apsw.SQLITE_DENY
        if action in _SCHEMA_ACTIONS or action == _A.SQLITE_ANALYZE:
            # (ANALYZE may create sqlite_stat1: a schema change too.)
            self.schema_epoch += 1
        if self.record is not None and self.user_prepare:
            self.record.append((action, arg3, arg4))
        self.observe(action, arg3, arg4)
        reason = refusal(self.write, action, arg3, arg4, not self.user_prepare, db, self.in_txn)
        if reason is None:
            return apsw.SQLITE_OK
        if self.denied is None:
            self.denied = reason
        return apsw.SQLITE_DENY


    def observe(self, action: int, arg3: str | None, arg4: str | None) -> None:
        """What an authorizer call tells about the statement (read and write sets, flags);
        also replayed for a statement run from apsw's cache (StatementMemo)."""
        self.prepared = True
        if action == _A.SQLITE_FUNCTION and (arg4 or "").lower() in VOLATILE_FUNCTIONS:
            self.volatile = True
        if (self.reads is not None or self.writes is not None) and self.user_prepare:
            # Not a nested prepare's: a virtual table (FTS5) prepares its own statements on
            # its shadow tables once per connection and caches them, so a node that had
            # written the table before saw none of them and a fresh one saw them all (its
            # sqlite_raftsql_tables then differed). The table itself is the user's.
            self._track(action, arg3, arg4)
        if action in _SCHEMA_ACTIONS:
            self.schema_change = True
            name = arg4 if action == _A.SQLITE_ALTER_TABLE else arg3
            kind = _DEFINES.get(action)
            if kind is not None and name and self.user_prepare:
                if self.defined is None:
                    self.defined = set()
                self.defined.add((kind, name.lower()))
        elif (action == _A.SQLITE_INSERT or action == _A.SQLITE_UPDATE) and arg3 == "sqlite_sequence":
            self.sequence_written = True

    def _track(self, action: int, arg3: str | None, arg4: str | None) -> None:
        """Record what a statement reads and may write, statically (from its compiled program,
        trigger bodies and views included): deterministic, and a superset of what one run
        touches. Table granularity; see DESIGN.md, "Serializable transactions"."""
        if action == _A.SQLITE_READ:
            if self.reads is not None and arg3 and arg3.lower() not in self.shadow:
                self.reads.add(tracked(arg3))
        elif action in _ROW_WRITES:
            if self.writes is not None and arg3 and arg3.lower() not in self.shadow:
                self.writes.add(tracked(arg3))
        elif action == _A.SQLITE_PRAGMA:
            # A pragma reads the schema or the header; setting user_version/application_id
            # changes the header, which counts as the schema.
            if arg4 is None:
                if self.reads is not None:
                    self.reads.add(SCHEMA)
            elif self.writes is not None and (arg3 or "").lower() in _WRITABLE_SETTINGS:
                self.writes.add(SCHEMA)
        elif action in _SCHEMA_ACTIONS and self.writes is not None:
            self.writes.add(SCHEMA)
        elif action == _A.SQLITE_ANALYZE and self.writes is not None:
            # ANALYZE writes the planner's statistics (only its DELETEs reach the authorizer).
            self.writes.add("sqlite_stat1")


class StatementMemo:
    """(The apply connection no longer runs user statements from apsw's cache: a cached
    statement's VM step counter carries over between runs, which made the step limit depend
    on a node's history; server/DESIGN.md, "Step limit". It still asks the memo, which keeps
    each text's result columns; what follows describes the cached runs it was built for.)

    Lets a connection's user statements run from apsw's statement cache although its Guard
    learns what each statement reads and writes only while SQLite prepares it (the authorizer
    is not called for a cached statement). Preparing a point statement again for every run
    cost about 13 µs, with the authorizer's Python calls; a bank transfer's commit runs five
    on every node (server/DESIGN.md, "Prepared statements").

    The first run of a text under a schema state prepares it afresh (can_cache=False) and
    records the authorizer calls made before its exec trace; later runs under the same schema
    state replay those calls into the Guard (Guard.observe) and take the cached statement. What
    the Guard learns is thus a function of the text and the schema alone, whatever the cache
    holds, so every node decides alike.

    A schema state is (schema cookie, Guard.schema_epoch). The cookie goes up with every schema
    change and comes back down when a rollback undoes one; the epoch goes up whenever a user
    statement is prepared with a schema action. Between two epoch steps the schema changes only
    by rollbacks, each to an earlier state with a smaller cookie, so the pair never names two
    different schemas. A cached statement that SQLite re-prepares (after a rollback expired it)
    is re-authorized as a nested prepare (Guard.user_prepare is off by then), which loosens one
    rule only (refusal, `nested`): harmless, since the same text under the same schema passed
    the strict rules on its fresh run. Schema statements are never run from the cache.
    (Guard.schema_change is therefore never among a cached statement's effects.)

    The fresh run's result columns (its description) are kept with its effects too: a cached
    statement that the schema has changed under is re-prepared by SQLite only when it steps,
    after the exec trace, so the description apsw gives there is the old schema's (a column
    added to a table was missing from `SELECT *`'s names, and the commit check saw different
    column names than the preview had). A cached run takes `description` instead."""

    MAX_ENTRIES = 512

    __slots__ = ("_effects", "captured", "description")

    def __init__(self) -> None:
        # key -> what replaying its authorizer calls does to a Guard: (reads, writes,
        # volatile, sequence_written), and the fresh run's description; schema statements are
        # never kept.
        self._effects: dict[tuple[str, int, int], tuple[frozenset, frozenset, bool, bool, tuple]] = {}
        self.captured: list[tuple[int, str | None, str | None]] | None = None
        # The description of the statement being run, if it comes from the cache (else None:
        # the exec trace asks the freshly prepared statement).
        self.description: tuple | None = None

    def start(self, guard: Guard, sql: str, cookie: int) -> tuple[tuple[str, int, int] | None, bool]:
        """Before running sql: (its key, or None if never cached; whether it may come from the
        cache). A cached run has its recorded authorizer calls replayed into guard here; an
        uncached one records them (guard.record) until its exec trace calls captured_now()."""
        self.captured = None
        self.description = None
        if len(sql) > MAX_CACHED_SQL:  # longer texts are always prepared afresh
            return None, False
        key = (sql, cookie, guard.schema_epoch)
        effects = self._effects.get(key)
        if effects is None:
            guard.record = []
            return key, False
        # Guard.observe for each recorded call, folded (Guard.observe says what they do).
        reads, writes, volatile, sequence_written, self.description = effects
        guard.prepared = True
        if reads and guard.reads is not None:
            guard.reads |= reads
        if writes and guard.writes is not None:
            guard.writes |= writes
        if volatile:
            guard.volatile = True
        if sequence_written:
            guard.sequence_written = True
        return key, True

    def capture(self, guard: Guard) -> None:
        """From the exec trace: the statement is prepared; keep what the authorizer said."""
        if guard.record is not None:
            self.captured, guard.record = guard.record, None

    def finish(self, guard: Guard, key: tuple[str, int, int] | None, description: tuple) -> None:
        """After the run (whatever its outcome): remember a successful fresh prepare's calls
        and the description its exec trace read."""
        guard.record = None
        self.description = None
        captured, self.captured = self.captured, None
        if key is None or captured is None:
            return
        if any(action in _SCHEMA_ACTIONS for action, _, _ in captured):
            return
        scratch = Guard(guard.write)
        scratch.reads, scratch.writes = set(), set()
        for action, arg3, arg4 in captured:
            scratch.observe(action, arg3, arg4)
        if len(self._effects) >= self.MAX_ENTRIES:
            self._effects.clear()
        self._effects[key] = (frozenset(scratch.reads), frozenset(scratch.writes),
                              scratch.volatile, scratch.sequence_written, description)


def tracked(name: str) -> str:
    name = name.lower()
    return SCHEMA if name in _SCHEMA_NAMES else name


def too_many_windows(sql: str) -> bool:
    """More than MAX_WINDOWS window functions in the text: OVER followed by '(' or by a name the
    text defines with `name AS (` (a WINDOW clause's; a CTE's too, which can only count more).
    A column named over followed by AS, FROM or another name is not one. The text is tokenized
    (about 0.2 s a megabyte of dense SQL) only if it holds more than MAX_WINDOWS words "over",
    counted at C speed."""
    if sum(1 for _ in islice(_OVER.finditer(sql), MAX_WINDOWS + 1)) <= MAX_WINDOWS:
        return False
    toks = list(tokens(sql))
    defined = {a[1] for a, b, c in zip(toks, toks[1:], toks[2:], strict=False)
               if a[0] == "name" and b == ("name", "as") and c == ("punct", "(")}
    return sum(1 for (kind, text), nxt in zip(toks, toks[1:], strict=False)
               if kind == "name" and text == "over"
               and (nxt == ("punct", "(") or (nxt[0] == "name" and nxt[1] in defined))) > MAX_WINDOWS


def prepare_bounded(conn: apsw.Connection, guard: Guard, sql: str, execute: Callable[[], T]) -> T:
    """Run execute(), which prepares one user statement (its text: sql) on conn (and may step
    it), within the flattening bounds (FULL_EXPR_DEPTH and SELECT_CAP, else SHALLOW_EXPR_DEPTH)
    and MAX_WINDOWS. The caller's exec trace ends the count (Guard.selects_left = None) once the
    statement is prepared, so the statements a virtual table prepares while it runs are not
    counted. What passes depends only on the text and the schema (the apply connection has
    connected every virtual table before a user statement is prepared), so every node decides
    alike."""
    if too_many_windows(sql):
        guard.denied = TOO_MANY_WINDOWS
        raise apsw.AuthError(f"not authorized: {TOO_MANY_WINDOWS}")
    guard.capped = False
    guard.selects_left = SELECT_CAP
    try:
        return execute()
    except apsw.AuthError:
        if not guard.capped:
            raise
    finally:
        guard.selects_left = None
    # More SELECTs than the cap: again, with no cap and every expression and nesting level
    # held to SHALLOW_EXPR_DEPTH (what the first attempt recorded is dropped).
    guard.denied = None
    if guard.record is not None:
        guard.record.clear()
    conn.limit(apsw.SQLITE_LIMIT_EXPR_DEPTH, SHALLOW_EXPR_DEPTH)
    try:
        return execute()
    except apsw.SQLError as e:
        if not any(text in str(e) for text in _DEPTH_ERRORS):
            raise
        guard.denied = TOO_COMPLEX
        raise apsw.AuthError(f"not authorized: {TOO_COMPLEX}") from None
    finally:
        conn.limit(apsw.SQLITE_LIMIT_EXPR_DEPTH, FULL_EXPR_DEPTH)


def configure(conn: apsw.Connection, guard: Guard) -> None:
    """Settings every connection shares, pinned rather than left to build defaults so that
    every node's SQLite behaves alike."""
    conn.set_busy_timeout(BUSY_TIMEOUT_MS)
    conn.enable_load_extension(False)
    for op, value in (
        (apsw.SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION, 0),
        (apsw.SQLITE_DBCONFIG_ENABLE_FTS3_TOKENIZER, 0),
        (apsw.SQLITE_DBCONFIG_DEFENSIVE, 1),
        (apsw.SQLITE_DBCONFIG_WRITABLE_SCHEMA, 0),
        (apsw.SQLITE_DBCONFIG_TRUSTED_SCHEMA, 1),
        (apsw.SQLITE_DBCONFIG_ENABLE_FKEY, 0),
        (apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 1),
        (apsw.SQLITE_DBCONFIG_ENABLE_VIEW, 1),
        (apsw.SQLITE_DBCONFIG_DQS_DML, 1),
        (apsw.SQLITE_DBCONFIG_DQS_DDL, 1),
        (apsw.SQLITE_DBCONFIG_LEGACY_ALTER_TABLE, 0),
        (apsw.SQLITE_DBCONFIG_REVERSE_SCANORDER, 0),
        (apsw.SQLITE_DBCONFIG_ENABLE_QPSG, 0),
        (apsw.SQLITE_DBCONFIG_ENABLE_ATTACH_CREATE, 0),
        (apsw.SQLITE_DBCONFIG_ENABLE_ATTACH_WRITE, 0),
    ):
        conn.config(op, value)
    conn.limit(apsw.SQLITE_LIMIT_ATTACHED, 0)
    conn.limit(apsw.SQLITE_LIMIT_EXPR_DEPTH, FULL_EXPR_DEPTH)
    conn.limit(apsw.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    conn.pragma("recursive_triggers", 0)
    conn.pragma("automatic_index", 1)
    conn.authorizer = guard
