"""Per-variable include/exclude filters, resolved once against the real names.

Patterns are globs: ``*`` matches any run of characters (dots included), ``?`` one
character, ``[abc]`` one of a set, and ``#`` one or more digits. The last one names the
numbered families that emulators use for vertical levels: ``thetao_#`` matches
``thetao_0`` … ``thetao_N`` but neither ``thetao`` nor ``thetao_mean``.

A name is selected when it matches at least one include pattern and no exclude pattern.
A pattern that matches none of the names is an error by default, with close matches
suggested, so that a typo never silently switches a penalty off.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache

import attrs

from .errors import FilterError, suggest

ON_UNMATCHED = ("error", "warn", "ignore")


@lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Translate one filter pattern into an anchored regular expression."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "#":
            out.append("[0-9]+")
        elif char == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def matches(pattern: str, name: str) -> bool:
    """Whether *name* matches the filter *pattern*."""
    return compile_pattern(pattern).match(name) is not None


@attrs.frozen
class VariableFilter:
    """Include/exclude patterns of one plugin instance.

    ``owner`` names the instance in error messages; ``on_unmatched`` says what a pattern
    that matches nothing does: ``"error"`` (the default), ``"warn"`` or ``"ignore"``.
    Patterns that together select nothing are an error unless ``allow_empty`` (the
    plugin's ``allows_empty_selection``): an instance acting on nothing is switched off.
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    owner: str = "filter"
    on_unmatched: str = attrs.field(
        default="error", validator=attrs.validators.in_(ON_UNMATCHED)
    )
    allow_empty: bool = False

    matches = staticmethod(matches)

    @property
    def selects_nothing(self) -> bool:
        """Whether the patterns select nothing whatever the names are (no include pattern,
        or an exclude pattern that matches every name)."""
        return not self.include or "*" in self.exclude

    def check_selects_something(self, kind: str = "name") -> None:
        """Refuse patterns that select nothing whatever the names, unless ``allow_empty``."""
        if self.selects_nothing and not self.allow_empty:
            raise FilterError(
                f"{self.owner}: include {list(self.include)} and exclude {list(self.exclude)} "
                f"select none of the {kind}s, whatever they are, so the instance would act on "
                "nothing; widen include or narrow exclude, or remove the instance"
            )

    def select(self, names: Iterable[str], *, kind: str = "variable") -> tuple[str, ...]:
        """Return the selected names, in the order given.

        Call this once (in ``setup``, or the first time the names are known) and keep the
        result: it checks every pattern against every name. *kind* names what the names
        are (``"parameter"``, ``"output variable"``, ``"module"``) in error messages.
        """
        names = list(names)
        for option, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(matches(pattern, n) for n in names):
                    self._unmatched(option, pattern, names, kind)
        selected = tuple(
            n
            for n in names
            if any(matches(p, n) for p in self.include)
            and not any(matches(p, n) for p in self.exclude)
        )
        if not selected and not self.allow_empty:
            shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
            raise FilterError(
                f"{self.owner}: include {list(self.include)} and exclude "
                f"{list(self.exclude)} select none of the {kind}s ({shown or 'there are none'}), "
                f"so the instance would act on nothing; widen include or narrow exclude, or "
                "remove the instance"
            )
        return selected

    def _unmatched(self, option: str, pattern: str, names: Sequence[str], kind: str) -> None:
        if self.on_unmatched == "ignore":
            return
        shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
        message = (
            f"{self.owner}.{option}: pattern {pattern!r} matches no {kind}"
            f"{suggest(pattern, names)}; the {kind}s are: {shown or '(none)'}. "
            "Fix the pattern, or set on_unmatched = 'warn' to allow it."
        )
        if self.on_unmatched == "error":
            raise FilterError(message)
        warnings.warn(message, stacklevel=3)
