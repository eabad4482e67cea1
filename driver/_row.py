"""Row: a row_factory class that behaves like sqlite3.Row."""

from __future__ import annotations

from typing import Any

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class Row:
    """A result row usable as a tuple and as a mapping, like sqlite3.Row.

    Use it as a row_factory: ``conn.row_factory = raftsql.driver.Row``. Index it by position
    (int or slice) or by column name (case-insensitive, first match wins); keys() lists the
    column names; two rows are equal when they have the same columns and values.
    """

    __slots__ = ("_description", "_data")

    def __init__(self, cursor: Any, data: tuple, /):
        description = cursor.description
        if not isinstance(data, tuple):
            raise TypeError("Row() argument 2 must be tuple")
        self._description = description or ()
        self._data = data

    def keys(self) -> list[str]:
        return [d[0] for d in self._description]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            # As sqlite3: ASCII letters only fold ('É' does not find 'é').
            folded = key.translate(_ASCII_LOWER)
            for i, d in enumerate(self._description):
                if d[0].translate(_ASCII_LOWER) == folded:
                    return self._data[i]
            raise IndexError("No item with that key")
        if isinstance(key, (int, slice)):
            return self._data[key]
        raise IndexError("Index must be int or string")

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self):
        return iter(self._data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Row):
            return NotImplemented
        return self._description == other._description and self._data == other._data

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        return hash(tuple(self.keys())) ^ hash(self._data)

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in zip(self.keys(), self._data, strict=False))
        return f"<Row {items}>"
