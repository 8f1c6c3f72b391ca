"""A strict structured-field parser (RFC 9651 §4.2) for Lists of Items, what the IETF rate-limit
fields are: the tests read the gateway's fields with it (``http_sfv`` is not a dependency)."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

Params = dict[str, Any]
Member = tuple[Any, Params]


class Token(str):
    """An sf-token (kept apart from an sf-string)."""


class SFError(ValueError):
    """The text is not a valid structured-field List."""


_KEY_FIRST = set("abcdefghijklmnopqrstuvwxyz*")
_KEY_REST = _KEY_FIRST | set("0123456789_-.")
_TCHAR = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class _Parser:
    def __init__(self, text: str) -> None:
        if not text.isascii():
            raise SFError("not ASCII")
        self.s, self.i = text, 0

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def take(self) -> str:
        char = self.peek()
        if not char:
            raise SFError("unexpected end")
        self.i += 1
        return char

    def skip(self, chars: str) -> None:
        while self.peek() and self.peek() in chars:
            self.i += 1

    def list(self) -> list[Member]:
        self.skip(" ")
        members: list[Member] = []
        while self.peek():
            members.append(self.inner_list() if self.peek() == "(" else self.item())
            self.skip(" \t")
            if not self.peek():
                return members
            if self.take() != ",":
                raise SFError(f"expected ',' at {self.i - 1}")
            self.skip(" \t")
            if not self.peek():
                raise SFError("trailing comma")
        return members

    def inner_list(self) -> Member:
        self.take()
        items: list[Member] = []
        while True:
            self.skip(" ")
            if self.peek() == ")":
                self.take()
                return items, self.params()
            items.append(self.item())
            if self.peek() not in (" ", ")"):
                raise SFError("bad inner list")

    def item(self) -> Member:
        return self.bare(), self.params()

    def params(self) -> Params:
        params: Params = {}
        while self.peek() == ";":
            self.take()
            self.skip(" ")
            key = self.key()
            value: Any = True
            if self.peek() == "=":
                self.take()
                value = self.bare()
            params[key] = value
        return params

    def key(self) -> str:
        if self.peek() not in _KEY_FIRST or not self.peek():
            raise SFError(f"bad key start at {self.i}")
        start = self.i
        while self.peek() and self.peek() in _KEY_REST:
            self.i += 1
        return self.s[start:self.i]

    def bare(self) -> Any:
        char = self.peek()
        if char == "-" or char.isdigit() and char:
            return self.number()
        if char == '"':
            return self.string()
        if char and (char.isalpha() or char == "*"):
            return self.token()
        if char == ":":
            self.take()
            end = self.s.find(":", self.i)
            if end < 0 or not _BASE64.fullmatch(self.s[self.i:end]):
                raise SFError("bad byte sequence")
            value = self.s[self.i:end].encode()
            self.i = end + 1
            return value
        if char == "?":
            self.take()
            flag = self.take()
            if flag not in "01":
                raise SFError("bad boolean")
            return flag == "1"
        raise SFError(f"bad bare item at {self.i}")

    def number(self) -> int | Decimal:
        sign = -1 if self.peek() == "-" else 1
        if sign < 0:
            self.take()
        start = self.i
        while self.peek().isdigit() and self.peek():
            self.i += 1
        whole = self.s[start:self.i]
        if not whole:
            raise SFError("no digits")
        if self.peek() != ".":
            if len(whole) > 15:
                raise SFError("integer of more than 15 digits")
            return sign * int(whole)
        self.take()
        frac_start = self.i
        while self.peek().isdigit() and self.peek():
            self.i += 1
        frac = self.s[frac_start:self.i]
        if len(whole) > 12 or not 1 <= len(frac) <= 3:
            raise SFError("bad decimal")
        return sign * Decimal(f"{whole}.{frac}")

    def string(self) -> str:
        self.take()
        out: list[str] = []
        while True:
            char = self.take()
            if char == "\\":
                escaped = self.take()
                if escaped not in '"\\':
                    raise SFError("bad escape")
                out.append(escaped)
            elif char == '"':
                return "".join(out)
            elif not 0x20 <= ord(char) <= 0x7E:
                raise SFError("bad string character")
            else:
                out.append(char)

    def token(self) -> Token:
        start = self.i
        self.take()
        while self.peek() and (self.peek() in _TCHAR or self.peek() in ":/"):
            self.i += 1
        return Token(self.s[start:self.i])


def parse_sf_list(text: str) -> list[Member]:
    """Parse a structured-field List strictly (RFC 9651 §4.2.1); SFError on anything else."""
    parser = _Parser(text)
    members = parser.list()
    parser.skip(" ")
    if parser.peek():
        raise SFError("trailing characters")
    return members
