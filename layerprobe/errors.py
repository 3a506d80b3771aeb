"""The one exception type the CLI turns into a single line and a non-zero exit."""

from __future__ import annotations

import string


class _Flags(dict):
    def __missing__(self, name: str) -> str:
        return "--" + name.replace("_", "-")


class LayerprobeError(Exception):
    """Bad input or an environment problem the user can fix: the message says what and how.

    `advice` (optional) is the "how": a template naming the options to change as `{name}` fields, the
    parameter names of the function that raised it. They print as that function's CLI flags (`--name`)
    unless `flags` spells them otherwise. A caller that exposes the same parameters under other names
    re-raises `e.renamed(overwrite="--fresh")`: the advice is rendered again, never rewritten as text.
    """

    def __init__(self, message: str, *, advice: str | None = None, flags: dict[str, str] | None = None):
        self.problem = message
        self.advice = advice
        self.flags = dict(flags or {})
        super().__init__(self.text())

    @property
    def options(self) -> list[str]:
        """The parameter names the advice refers to."""
        return [name for _, name, _, _ in string.Formatter().parse(self.advice or "") if name]

    def text(self) -> str:
        if not self.advice:
            return self.problem
        return f"{self.problem}; {self.advice.format_map(_Flags(self.flags))}"

    def renamed(self, **flags: str) -> "LayerprobeError":
        """The same error, its advice naming the options as `flags` spells them (parameter name -> flag)."""
        return type(self)(self.problem, advice=self.advice, flags={**self.flags, **flags})


def first_line(err: BaseException) -> str:
    """The first line of an exception's message for a one-line error (its type's name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__
