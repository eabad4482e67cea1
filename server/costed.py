"""SQL functions whose C code SQLite cannot stop, with their work counted against the step limit.

SQLite checks its interrupt flag and calls the progress handler only between VM steps. One call
of LIKE, GLOB, instr(), replace() or the two-argument trim() runs to its end however long it
takes, and its work grows with the product of its operands' lengths: `x LIKE '%aaa…ab'` with a
100 MB value of 'a's and a 50,000-character pattern compares characters for about an hour, in
a handful of VM steps. In a write, every node's apply thread is held that long.

On the apply connection (writes, a transaction's previews and its commit check) these functions
are replaced by wrappers that first charge a bound of that work to the statement's step budget
(StateMachine.charge_steps: COMPARES_PER_STEP comparisons count as one VM step, every call
CALL_STEPS more, text past ASCII WIDE_WEIGHT per character), so a call that cannot finish
within the budget fails with the step-limit error before it starts, on every node alike. Then
they compute the result:
- instr() and replace() of two (three) strings, or of two blobs for instr(), in Python, whose
  str.find/str.replace are linear (two-way search), charged for the characters they pass;
- everything else with SQLite's own function, run on a private in-memory connection (the same
  library, so the same result, errors included), charged for a bound of SQLite's algorithm:
  for LIKE and GLOB, _match_work; for the other types and the trim set, the product of the
  lengths.

Reads on the reader connections keep SQLite's functions: a long call there holds one core of
one node to its end, since the read time limit is checked between steps too (server/DESIGN.md,
"Long C calls").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import apsw

from raftsql.server.sandbox import MAX_VALUE_BYTES

# Character comparisons charged as one VM step. SQLite's LIKE compares about 1.2 billion
# characters a second where its VM runs about 45 million steps (2026 laptop core, and the
# 2-core CI machine alike): 27 per step. Its worst cases compare a little slower (case
# folding, GLOB sets: up to 1.2x the bound at 16), so 12 charges a little more than they cost.
COMPARES_PER_STEP = 12

# Python's str.find, str.count and str.replace, which instr() and replace() of strings use,
# take up to about 4 times as long per character as SQLite's comparisons in their worst cases
# (6 ns a character for a 50 MB text): each character they pass counts this many comparisons.
SCAN_WEIGHT = 4

# What a value that is neither text nor blob (a number) counts as: its text is at most this long.
_NUMBER_LENGTH = 32

# Every call, however small its operands, costs a Python call and, for most, a statement on the
# private connection: 0.5-1.2 µs in a loop of them, 20-50 VM steps. Charged on top of the work,
# or a loop of small calls ran 10-20 times as long as the step limit stands for (24 s).
CALL_STEPS = 48

# SQLite's matchers and trims read text a UTF-8 character at a time: past ASCII its scan costs
# up to about 3x as much per character (a 4-byte character, measured). Text that is not all
# ASCII counts each character as this many.
WIDE_WEIGHT = 4


def _weight(*values: Any) -> int:
    return WIDE_WEIGHT if any(type(v) is str and not v.isascii() for v in values) else 1


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _length(value: Any) -> int:
    """What a value counts as: a number's text is short, NULL is nothing."""
    t = type(value)
    if t is str or t is bytes:
        return len(value)
    return _NUMBER_LENGTH


def _match_work(value: Any, pattern: Any, wildcard: str, any_one: str, marks: str,
                nocase: bool) -> int:
    """A bound of the characters SQLite's LIKE (nocase) or GLOB compares: its matcher takes the
    pattern's first stretch (up to the first `wildcard`) at the start of the value, then, for
    each stretch after a wildcard, tries every place of the rest of the value that holds the
    stretch's first character, comparing at most the stretch's length there, and never goes
    back to an earlier stretch (a later stretch that cannot be found ends the whole match). So
    the work is at most the value's length plus, per stretch, (places holding its first
    character + 1) x its length. A pattern with a character that makes a wildcard literal
    (`marks`: LIKE's escape, GLOB's '['), more than four stretches, a stretch starting with
    `any_one` (which every place holds), or operands of other types, are charged as if every
    place held every stretch: the value's length times the pattern's."""
    weight = _weight(value, pattern)
    n, m = _length(value) * weight, _length(pattern) * weight
    worst = n * (m + 1) + m
    kind = type(value)
    if kind is not type(pattern) or kind not in (str, bytes):
        return worst
    literal: list[Any] = list(marks)
    if kind is bytes:
        wildcard, any_one = wildcard.encode(), any_one.encode()  # type: ignore[assignment]
        literal = [mark.encode() for mark in marks]
    if any(mark in pattern for mark in literal):
        return worst
    stretches = [s for s in pattern.split(wildcard)[1:] if s]
    if len(stretches) > 4:
        return worst
    work = n + m
    for stretch in stretches:
        first = stretch[:1]
        if first == any_one:
            return worst
        places = value.count(first)
        if nocase and first.isascii() and first.isalpha():
            places += value.count(first.swapcase())
        work += (places + 1) * len(stretch) * weight
    return work


class CostedFunctions:
    """The wrappers of one apply connection. charge(steps) raises apsw.InterruptError (the
    step limit) when the statement's budget is spent; it does nothing outside user statements."""

    def __init__(self, charge: Callable[[int], None]):
        self._charge = charge
        self._aux = apsw.Connection(":memory:")
        self._aux.limit(apsw.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)  # as the apply connection
        self._cursor = self._aux.cursor()

    def install(self, conn: apsw.Connection) -> None:
        for name, fn, nargs in (
            ("like", self._like, 2), ("like", self._like_escape, 3), ("glob", self._glob, 2),
            ("instr", self._instr, 2), ("replace", self._replace, 3),
            ("trim", self._trim, 2), ("ltrim", self._ltrim, 2), ("rtrim", self._rtrim, 2),
        ):
            conn.create_scalar_function(name, fn, nargs, deterministic=True)

    def close(self) -> None:
        self._aux.close()

    def _sqlite(self, sql: str, *args: Any) -> Any:
        """SQLite's own function on the private connection: the same code, the same answer."""
        for row in self._cursor.execute(sql, args):
            return row[0]
        return None  # unreachable: a SELECT of one expression gives one row

    def _spend(self, work: int) -> None:
        self._charge(CALL_STEPS + work // COMPARES_PER_STEP)

    def _like(self, pattern: Any, value: Any) -> Any:
        self._spend(_match_work(value, pattern, "%", "_", "", True))
        return self._sqlite("SELECT like(?, ?)", pattern, value)

    def _like_escape(self, pattern: Any, value: Any, escape: Any) -> Any:
        marks = escape[:1] if type(escape) is str and escape else "%"  # else: charged the worst
        self._spend(_match_work(value, pattern, "%", "_", marks, True))
        return self._sqlite("SELECT like(?, ?, ?)", pattern, value, escape)

    def _glob(self, pattern: Any, value: Any) -> Any:
        self._spend(_match_work(value, pattern, "*", "?", "[", False))
        return self._sqlite("SELECT glob(?, ?)", pattern, value)

    def _instr(self, haystack: Any, needle: Any) -> Any:
        th, tn = type(haystack), type(needle)
        if (th is str and tn is str) or (th is bytes and tn is bytes):
            # Characters of text, bytes of blobs, counted from 1 (0: not found), as SQLite's.
            self._spend(SCAN_WEIGHT * (len(haystack) + len(needle)))
            return haystack.find(needle) + 1
        self._spend(_length(haystack) * _length(needle))
        return self._sqlite("SELECT instr(?, ?)", haystack, needle)

    def _replace(self, text: Any, old: Any, new: Any) -> Any:
        if type(text) is str and type(old) is str and type(new) is str:
            self._spend(SCAN_WEIGHT * (len(text) + len(old)))
            if not old or old[0] == "\0":
                return text  # SQLite's: an empty pattern (its first byte is NUL) changes nothing
            # The result's UTF-8 size before it is made, as SQLite refuses it past the limit
            # as it grows: a 99 MB text of one character times 100 would be 10 GB.
            size = _utf8_size(text) + text.count(old) * (_utf8_size(new) - _utf8_size(old))
            if size > MAX_VALUE_BYTES:
                raise apsw.TooBigError("string or blob too big")
            self._spend(SCAN_WEIGHT * size)
            return text.replace(old, new)
        self._spend(_length(text) * _length(old))
        return self._sqlite("SELECT replace(?, ?, ?)", text, old, new)

    def _trim(self, text: Any, chars: Any) -> Any:
        return self._trimmed("SELECT trim(?, ?)", text, chars)

    def _ltrim(self, text: Any, chars: Any) -> Any:
        return self._trimmed("SELECT ltrim(?, ?)", text, chars)

    def _rtrim(self, text: Any, chars: Any) -> Any:
        return self._trimmed("SELECT rtrim(?, ?)", text, chars)

    def _trimmed(self, sql: str, text: Any, chars: Any) -> Any:
        # Each character taken off an end is compared with every character of the set.
        self._spend(_length(text) * _length(chars) * _weight(text, chars))
        return self._sqlite(sql, text, chars)
