"""Privacy guard: a request marked private, or one a detector flags, never goes to the cloud."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

# name -> (pattern, extra check on the match). Kept conservative: a false positive only keeps a query on the device.
_DETECTORS: dict[str, tuple[re.Pattern[str], Callable[[str], bool] | None]] = {}


def _luhn(s: str) -> bool:
    digits = [int(c) for c in s if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return total % 10 == 0


def register_detector(name: str, pattern: str, check: Callable[[str], bool] | None = None) -> None:
    _DETECTORS[name] = (re.compile(pattern), check)


register_detector("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# international (+CC ...) or North American ((NNN) NNN-NNNN, NNN-NNN-NNNN) forms; bare digit runs are left alone
register_detector("phone", r"(?<![\w.+])(?:\+\d{1,3}[\s.-]?(?:\(?\d{1,4}\)?[\s.-]?){1,4}\d{3,4}"
                           r"|\(\d{3}\)\s?\d{3}[\s.-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?![\w.])")
register_detector("api_key", r"\b(?:sk|pk|rk|ghp|gho|github_pat|xox[abpr]|AKIA|hf)[-_][A-Za-z0-9_-]{16,}\b"
                             r"|\bAKIA[0-9A-Z]{16}\b|\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\b")
register_detector("card", r"\b(?:\d[ -]?){13,19}\b", _luhn)


def detector_table(names: tuple[str, ...] | None = None) -> list[dict[str, str | None]]:
    """The detectors as data, for the mobile app's copy of the guard: name, regex source and the name of the extra
    check (``luhn``) or None. The app's JavaScript compiles the same patterns."""
    chosen = names if names is not None else tuple(_DETECTORS)
    return [{"name": n, "pattern": _DETECTORS[n][0].pattern,
             "check": _DETECTORS[n][1].__name__.lstrip("_") if _DETECTORS[n][1] else None} for n in chosen]


@dataclass(frozen=True)
class PrivacyGuard:
    detectors: tuple[str, ...] = ("email", "phone", "api_key", "card")  # names of detectors to apply

    def __post_init__(self) -> None:
        from edgelm.errors import EdgelmError

        unknown = [d for d in self.detectors if d not in _DETECTORS]
        if unknown:
            raise EdgelmError(f"unknown privacy detector {unknown[0]!r}; known: {', '.join(sorted(_DETECTORS))}")

    def flags(self, text: str) -> list[str]:
        """Names of the detectors that fire on ``text``."""
        out = []
        for name in self.detectors:
            pattern, check = _DETECTORS[name]
            if any(check is None or check(m.group(0)) for m in pattern.finditer(text)):
                out.append(name)
        return out
