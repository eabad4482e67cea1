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
  an object with __conform__(protocol) -> its answer for PrepareProtocol, if not None (PEP 246,
                               as sqlite3), checked after the registered adapters

Anything else raises ProgrammingError("Error binding parameter ...: type '...' is not supported"),
and an int outside 64 bits raises OverflowError, both as sqlite3 does. Results come back as
None, int, float, str or bytes, unless the connection was opened with detect_types: then
converters (register_converter) turn the values of the columns they name into anything, from
the bytes sqlite3 would give them (see convert_value).
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


class PrepareProtocol:
    """The adaptation protocol of sqlite3 (PEP 246): register_adapter() keys adapters by
    (type, PrepareProtocol), and an object's __conform__(protocol) is called with this class."""


class _Adapters(dict):
    """sqlite3.adapters: {(type, PrepareProtocol): callable}. A bare type is accepted as a key
    too (this driver's older form)."""

    @staticmethod
    def _key(key: Any) -> Any:
        return key if isinstance(key, tuple) else (key, PrepareProtocol)

    def __getitem__(self, key: Any) -> Any:
        return super().__getitem__(self._key(key))

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(self._key(key), value)

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(self._key(key))

    def __contains__(self, key: Any) -> bool:
        return super().__contains__(self._key(key))

    def get(self, key: Any, default: Any = None) -> Any:
        return super().get(self._key(key), default)


# User adapters, by exact type (as sqlite3's register_adapter).
adapters: dict[Any, Callable[[Any], Any]] = _Adapters()
_MISSING = object()


def register_adapter(type_: type, adapter: Callable[[Any], Any], /) -> None:
    """Register callable(value) -> None/int/float/str/bytes to bind values of exactly type_."""
    adapters[(type_, PrepareProtocol)] = adapter


def adapt(obj: Any, proto: Any = PrepareProtocol, alt: Any = _MISSING, /) -> Any:
    """sqlite3.adapt(): the registered adapter for (type(obj), proto), else proto.__adapt__(obj),
    else obj.__conform__(proto) (the first answer that is not None), else alt, else
    ProgrammingError("can't adapt")."""
    adapter = adapters.get((type(obj), proto))
    if adapter is not None:
        return adapter(obj)
    for hook, arg in ((getattr(proto, "__adapt__", None), obj), (getattr(obj, "__conform__", None), proto)):
        if hook is not None:
            try:
                adapted = hook(arg)
            except TypeError:
                adapted = None
            if adapted is not None:
                return adapted
    if alt is not _MISSING:
        return alt
    raise ProgrammingError("can't adapt")


def _adapt(value: Any, where: str) -> Any:
    t = type(value)
    adapter = adapters.get((t, PrepareProtocol)) if adapters else None
    if adapter is not None:
        value = adapter(value)
        t = type(value)
    elif t not in _PLAIN:
        conform = getattr(value, "__conform__", None)
        if conform is not None:
            try:
                adapted = conform(PrepareProtocol)
            except TypeError:
                adapted = None
            if adapted is not None:
                value = adapted
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
        if type(value) is memoryview and not value.c_contiguous:
            raise BufferError("memoryview: underlying buffer is not C-contiguous")  # as sqlite3
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


_PLAIN = frozenset({int, float, str, bytes, type(None)})


def adapt_params(params: Any, names: tuple[str, ...] | None = None) -> list[Any] | dict[str, Any]:
    """sqlite3's parameter rules: a mapping binds named parameters (:name, @name, $name), any
    other sequence binds positional ones (?, ?NNN). Returns what goes on the wire. names: the
    statement's parameter names (driver/_sql.named_parameters), looked up as sqlite3 does, one
    by one with params[name] (a mapping's __missing__ answers; keys no parameter names are
    not sent, so their values need not be bindable); None: send every key."""
    if params is None:
        return []
    if isinstance(params, Mapping):
        out: dict[str, Any] = {}
        if names is not None:
            for k in names:
                try:
                    v = params[k]
                except KeyError:
                    continue  # the node says which one is missing, in sqlite3's words
                out[k] = _adapt(v, f":{k}")
            return out
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


# --------------------------------------------------------------------------- converters

PARSE_DECLTYPES = 1
PARSE_COLNAMES = 2

# sqlite3.converters: {UPPER-CASE NAME: callable(bytes)}.
converters: dict[str, Callable[[bytes], Any]] = {}


def register_converter(typename: str, converter: Callable[[bytes], Any], /) -> None:
    """As sqlite3: with detect_types, values of columns declared (PARSE_DECLTYPES) or named
    "name [typename]" (PARSE_COLNAMES) as typename are passed, as bytes, to converter.
    Names are case-insensitive."""
    if not isinstance(typename, str):
        raise TypeError(f"register_converter() argument 1 must be str, not {type(typename).__name__}")
    converters[typename.upper()] = converter


def _convert_date(val: bytes) -> datetime.date:
    return datetime.date(*map(int, val.split(b"-")))


def _convert_timestamp(val: bytes) -> datetime.datetime:
    datepart, timepart = val.split(b" ")
    year, month, day = map(int, datepart.split(b"-"))
    clock, _, fraction = timepart.partition(b".")
    hours, minutes, seconds = map(int, clock.split(b":"))
    micro = int(f"{fraction.decode():0<6.6}") if fraction else 0
    return datetime.datetime(year, month, day, hours, minutes, seconds, micro)


# sqlite3's default converters (deprecated in Python 3.12, still registered there).
register_converter("date", _convert_date)
register_converter("timestamp", _convert_timestamp)


def column_converter(name: str, decltype: str | None, detect_types: int) -> Callable[[bytes], Any] | None:
    """The converter sqlite3 picks for a result column (CPython's _pysqlite_build_row_cast_map):
    PARSE_COLNAMES first, the text between the first '[' of the column's name and the next ']';
    then PARSE_DECLTYPES, the declared type up to its first blank or '('."""
    if detect_types & PARSE_COLNAMES:
        start = name.find("[")
        if start >= 0:
            end = name.find("]", start + 1)
            if end >= 0:
                conv = converters.get(name[start + 1:end].upper())
                if conv is not None:
                    return conv
    if detect_types & PARSE_DECLTYPES and decltype:
        cut = len(decltype)
        for stop in (" ", "("):
            i = decltype.find(stop)
            if 0 <= i < cut:
                cut = i
        return converters.get(decltype[:cut].upper())
    return None


def column_name(name: str, detect_types: int) -> str:
    """A result column's name in description: with PARSE_COLNAMES, cut before its first '['
    (and one blank before it), as sqlite3 does."""
    if detect_types & PARSE_COLNAMES:
        i = name.find("[")
        if i >= 0:
            return name[:i - 1] if i > 0 and name[i - 1] == " " else name[:i]
    return name


def _real_text(v: float) -> bytes:
    """A REAL as SQLite renders it as text ("%!.15g": 1.0, 1.0e+20, 0.1, Inf)."""
    if v != v:
        return b""  # SQLite stores NaN as NULL; never reached for a stored value
    if v in (float("inf"), float("-inf")):
        return b"Inf" if v > 0 else b"-Inf"
    s = f"{v:.15g}"
    mantissa, e, exp = s.partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return (mantissa + e + exp).encode()


def convert_value(value: Any, converter: Callable[[bytes], Any]) -> Any:
    """What sqlite3 passes a converter: the value's bytes as sqlite3_column_blob gives them
    (an INTEGER or REAL as its text, TEXT as UTF-8); NULL stays None and is not converted."""
    if value is None:
        return None
    t = type(value)
    if t is bytes:
        raw = value
    elif t is str:
        raw = value.encode("utf-8")
    elif t is int:
        raw = str(value).encode()
    elif t is float:
        raw = _real_text(value)
    else:
        raw = bytes(value)
    return converter(raw)
