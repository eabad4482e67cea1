"""DB-API type constructors and type objects, and the adaptation of Python values to the values
SQLite can bind (what the sqlite3 module's default adapters did).

Values sent to the server: None, int (signed 64-bit), float, str, bytes. Adapted before sending:

  bool                      -> int (0/1), as sqlite3 binds it
  bytearray, memoryview     -> bytes (Binary() returns a memoryview, as sqlite3's)
  datetime.datetime         -> "YYYY-MM-DD HH:MM:SS[.ffffff][+HH:MM]"  (isoformat(" "), sqlite3's
                               default adapter)
  datetime.date             -> "YYYY-MM-DD"                  (isoformat(), sqlite3's default)
  datetime.time             -> "HH:MM:SS[.ffffff]"           (isoformat(); sqlite3 has no default
                               adapter for time; we add one so Time() values can be bound)
  int/str/float subclasses  -> the base type (IntEnum, StrEnum...)
  anything registered with register_adapter(type, callable) -> callable(value), checked first

Anything else raises ProgrammingError("Error binding parameter ...: type '...' is not supported"),
and an int outside 64 bits raises OverflowError, both as sqlite3 does. Results come back as
None, int, float, str or bytes: there are no converters (SQLite has no date type; parse the ISO
strings with datetime.fromisoformat).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from raftsql.command import plain_values
from raftsql.driver._exceptions import ProgrammingError

Date = datetime.date
Time = datetime.time
Timestamp = datetime.datetime


def DateFromTicks(ticks: float) -> datetime.date:  # noqa: N802 - PEP 249 name
    return Date(*time.localtime(ticks)[:3])


def TimeFromTicks(ticks: float) -> datetime.time:  # noqa: N802
    return Time(*time.localtime(ticks)[3:6])


def TimestampFromTicks(ticks: float) -> datetime.datetime:  # noqa: N802
    return Timestamp(*time.localtime(ticks)[:6])


Binary = memoryview  # as sqlite3


# --------------------------------------------------------------------------- type objects


def affinity(decltype: str | None) -> str | None:
    """SQLite's column affinity for a declared type (https://sqlite.org/datatype3.html 3.1), or
    None for a result column without a declared type (an expression)."""
    if decltype is None:
        return None
    t = decltype.upper()
    if "INT" in t:
        return "INTEGER"
    if "CHAR" in t or "CLOB" in t or "TEXT" in t:
        return "TEXT"
    if "BLOB" in t or not t.strip():
        return "BLOB"
    if "REAL" in t or "FLOA" in t or "DOUB" in t:
        return "REAL"
    return "NUMERIC"


def _is_datetime(decltype: str) -> bool:
    t = decltype.upper()
    return affinity(decltype) == "NUMERIC" and ("DATE" in t or "TIME" in t)


class DBAPITypeObject:
    """A PEP 249 type object. A type code in Cursor.description is the column's declared type
    (a str such as "VARCHAR(20)", or None for an expression); a type object compares equal to
    the type codes it covers, by SQLite's affinity rules:

      STRING    TEXT affinity (declared type contains CHAR, CLOB or TEXT)
      BINARY    BLOB affinity (declared type contains BLOB)
      NUMBER    INTEGER, REAL or NUMERIC affinity, except the date/time names below
      DATETIME  NUMERIC affinity and the declared type contains DATE or TIME (DATE, DATETIME,
                TIMESTAMP: SQLite stores them as text or numbers, see datatype3.html 2.2)
      ROWID     the declared type is exactly INTEGER, the only type a rowid alias (INTEGER
                PRIMARY KEY) can have; such a column is also a NUMBER
    """

    def __init__(self, name: str, match: Callable[[str], bool]):
        self.name = name
        self._match = match

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DBAPITypeObject):
            return other is self
        if isinstance(other, str):
            return self._match(other)
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"<raftsql.driver.{self.name}>"


STRING = DBAPITypeObject("STRING", lambda t: affinity(t) == "TEXT")
BINARY = DBAPITypeObject("BINARY", lambda t: affinity(t) == "BLOB")
NUMBER = DBAPITypeObject(
    "NUMBER", lambda t: affinity(t) in ("INTEGER", "REAL", "NUMERIC") and not _is_datetime(t)
)
DATETIME = DBAPITypeObject("DATETIME", _is_datetime)
ROWID = DBAPITypeObject("ROWID", lambda t: t.strip().upper() == "INTEGER")


# --------------------------------------------------------------------------- adaptation

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

# User adapters, by exact type (as sqlite3's register_adapter).
adapters: dict[type, Callable[[Any], Any]] = {}


def register_adapter(type_: type, adapter: Callable[[Any], Any], /) -> None:
    """Register callable(value) -> None/int/float/str/bytes to bind values of exactly type_."""
    adapters[type_] = adapter


def _adapt(value: Any, where: str) -> Any:
    t = type(value)
    if t in adapters:
        value = adapters[t](value)
        t = type(value)
    if value is None or t is str or t is float or t is bytes:
        return value
    if t is int or (isinstance(value, int) and not isinstance(value, bool)):
        if not INT64_MIN <= value <= INT64_MAX:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return int(value)
    if t is bool:
        return int(value)
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, datetime.datetime):
        return value.isoformat(" ")
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, datetime.time):
        return value.isoformat()
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, bytes):
        return bytes(value)
    raise ProgrammingError(f"Error binding parameter {where}: type '{t.__name__}' is not supported")


def adapt_params(params: Any) -> list[Any] | dict[str, Any]:
    """sqlite3's parameter rules: a mapping binds named parameters (:name, @name, $name), any
    other sequence binds positional ones (?, ?NNN). Returns what goes on the wire."""
    if params is None:
        return []
    if isinstance(params, Mapping):
        out: dict[str, Any] = {}
        for k, v in params.items():
            if not isinstance(k, str):
                raise ProgrammingError(f"parameter names must be str, not {type(k).__name__}")
            out[k] = _adapt(v, f":{k}")
        return out
    if isinstance(params, Sequence) or hasattr(params, "__getitem__") and hasattr(params, "__len__"):
        if not adapters and plain_values(params):  # the common case (executemany of many rows)
            return list(params)
        return [_adapt(v, str(i)) for i, v in enumerate(params, 1)]
    raise ProgrammingError("parameters are of unsupported type")
