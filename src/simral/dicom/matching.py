"""Attribute matching of PS3.4 C.2.2.2 (also used by QIDO-RS, PS3.18 §8.3.4).

A query value becomes a :class:`Match`: universal, single value, wildcard, list of UIDs (or of
values), or range (DA, TM, DT). Person names match case-insensitively (simral's choice, allowed by
C.2.2.2.1); other VRs match case-sensitively.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

MatchKind = Literal["universal", "single", "wildcard", "list", "range"]
RANGE_VRS = {"DA", "TM", "DT"}


@dataclass(frozen=True)
class Match:
    """A parsed matching key: ``values`` holds one value, a list, or the (low, high) range ends."""

    kind: MatchKind
    values: tuple[str, ...] = ()
    case_insensitive: bool = False

    def matches(self, candidate: str) -> bool:
        """Whether ``candidate`` (a stored value, possibly multi-valued with '\\') matches."""
        if self.kind == "universal":
            return True
        stored_values = candidate.split("\\") if candidate else [""]
        if self.case_insensitive:
            stored_values = [v.upper() for v in stored_values]
        return any(self._matches_one(v) for v in stored_values)

    def _matches_one(self, value: str) -> bool:
        if self.kind == "single":
            return value == self.values[0] or (
                self.case_insensitive and _pn_group_match(value, self.values[0])
            )
        if self.kind == "list":
            return value in self.values
        if self.kind == "wildcard":
            pattern = wildcard_regex(self.values[0])
            if pattern.fullmatch(value):
                return True
            return self.case_insensitive and any(pattern.fullmatch(g) for g in value.split("="))
        low, high = self.values
        if not value:
            return False
        return (not low or value >= low) and (not high or value <= high)


def _pn_group_match(value: str, wanted: str) -> bool:
    return any(group == wanted for group in value.split("="))


def wildcard_regex(pattern: str) -> re.Pattern[str]:
    """A regex equivalent of a DICOM wildcard value (``*`` any run, ``?`` one character)."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.S)


def wildcard_to_like(pattern: str, escape: str = "!") -> str:
    """A SQL LIKE pattern (with ``escape``) equivalent of a DICOM wildcard value."""
    out = []
    for c in pattern:
        if c == "*":
            out.append("%")
        elif c == "?":
            out.append("_")
        elif c in {"%", "_", escape}:
            out.append(escape + c)
        else:
            out.append(c)
    return "".join(out)


def normalise_da(value: str) -> str:
    """DA as YYYYMMDD (accepts the ACR-NEMA ``YYYY.MM.DD`` form too)."""
    return value.strip().replace(".", "").replace("-", "")


def normalise_tm(value: str) -> str:
    """TM as ``HHMMSS.FFFFFF`` so that string order is time order (PS3.5 §6.2 TM)."""
    value = value.strip().replace(":", "")
    if not value:
        return ""
    whole, _, fraction = value.partition(".")
    if len(whole) in {2, 4}:
        whole = (whole + "0000")[:6]
    return f"{whole[:6]}.{(fraction + '000000')[:6]}"


def _normalise_range_end(vr: str, value: str, *, high: bool) -> str:
    if not value:
        return ""
    if vr == "DA":
        return normalise_da(value)
    if vr == "TM":
        digits = value.strip().replace(":", "")
        if high and "." not in digits:
            # "-1030" includes the whole of 10:30 (C.2.2.2.5): pad the missing parts with maxima.
            digits = (digits + "5959"[: max(0, 6 - len(digits))])[:6] + ".999999"
        return normalise_tm(digits)
    return value


def parse_match(value: str | None, vr: str) -> Match:
    """Turn a query value into a :class:`Match` per PS3.4 C.2.2.2."""
    if value is None:
        return Match("universal")
    value = str(value)
    if vr != "PN":
        value = value.strip()
    case_insensitive = vr == "PN"
    if case_insensitive:
        value = value.strip().upper()
    if value in {"", "*"}:
        return Match("universal")
    if vr in RANGE_VRS and "-" in value and "\\" not in value:
        low, _, high = value.partition("-")
        return Match(
            "range",
            (_normalise_range_end(vr, low, high=False), _normalise_range_end(vr, high, high=True)),
        )
    if "\\" in value:
        parts = tuple(p for p in value.split("\\"))
        return Match("list", parts, case_insensitive)
    if vr not in {"UI", "DA", "TM", "DT"} and ("*" in value or "?" in value):
        return Match("wildcard", (value,), case_insensitive)
    if vr == "DA":
        value = normalise_da(value)
    elif vr == "TM":
        value = normalise_tm(value)
    return Match("single", (value,), case_insensitive)
