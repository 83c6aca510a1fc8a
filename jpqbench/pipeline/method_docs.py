"""docs/methods.md, generated from the method registry: each method's class docstring and ``Hparams``.

The docstring is a method's documentation (the docstring rule of docs/adding-a-method.md), so
the per-method page is rendered from it rather than written beside it, and the two cannot
drift: ``jpqbench list methods --markdown > docs/methods.md`` writes the page, and
tests/methods/test_method_docs.py fails when the committed page differs from :func:`render_method_docs`.

Docstrings are reST-ish; the rendering turns them into Markdown that reads the same: double
backticks become single ones, a Sphinx role (class, func, meth, mod, attr, data, ...) becomes
plain code, and an asterisk that is neither a list marker nor part of an emphasis pair is
escaped (as in ``H*W`` or ``x * y``).
The output depends only on the registered methods (sorted by name), never on the time or the
machine.
"""
from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Iterable
from typing import Any

from pydantic_core import PydanticUndefined

COMMAND = "jpqbench list methods --markdown > docs/methods.md"

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc|const):`~?([^`]+)`")
_DOUBLE_TICKS = re.compile(r"``(.+?)``", re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`]+`")
# an emphasis pair: *x* or **x**, opened after a non-word character and closed before one
_EMPHASIS = re.compile(r"(?<![\w*\\])(\*\*|\*)(?=[^\s*])(.+?)(?<=[^\s*\\])\1(?![\w*])", re.DOTALL)
_LIST_MARKER = re.compile(r"(?m)^([ \t]*)\* ")


def _protect(text: str, pattern: re.Pattern, store: list[str]) -> str:
    """``text`` with every match of ``pattern`` replaced by a placeholder kept in ``store``."""

    def keep(match: re.Match) -> str:
        store.append(match.group(0))
        return f"\x00{len(store) - 1}\x00"

    return pattern.sub(keep, text)


def _restore(text: str, store: list[str]) -> str:
    while "\x00" in text:
        text = re.sub(r"\x00(\d+)\x00", lambda m: store[int(m.group(1))], text)
    return text


def rest_to_markdown(text: str) -> str:
    """A reST-ish docstring fragment as Markdown (see the module docstring)."""
    text = _ROLE.sub(r"``\1``", text)
    text = _DOUBLE_TICKS.sub(lambda m: f"`{m.group(1)}`", text)
    store: list[str] = []
    text = _protect(text, _CODE_SPAN, store)
    text = _protect(text, _LIST_MARKER, store)
    text = _protect(text, _EMPHASIS, store)
    text = text.replace("*", r"\*")
    return _restore(text, store)


def _type_name(annotation: Any) -> str:
    """A hyperparameter's annotation as it reads in the source: ``float | None``, ``tuple[int, ...]``."""
    if annotation is type(None):
        return "None"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if origin is not None:
        inner = ", ".join("..." if arg is Ellipsis else _type_name(arg) for arg in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _default(field: Any) -> str:
    """A hyperparameter's default as it is written in a YAML config (JSON is YAML)."""
    value = field.default
    if value is PydanticUndefined:
        if field.default_factory is None:
            return "(required)"
        value = field.default_factory()

    def plain(item: Any) -> Any:
        if isinstance(item, (tuple, list)):
            return [plain(x) for x in item]
        if isinstance(item, dict):
            return {str(k): plain(v) for k, v in item.items()}
        return item

    return json.dumps(plain(value))


def _cell(text: str) -> str:
    """Table-cell text: one line, pipes escaped (GitHub tables split on them even inside code)."""
    return " ".join(text.split()).replace("|", r"\|")


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def docstring_summary(obj: object) -> str:
    """The docstring's first line: what ``jpqbench list`` shows beside a name."""
    doc = inspect.cleandoc(obj.__doc__ or "")
    return doc.splitlines()[0] if doc else ""


def method_doc(cls: type) -> str:
    """The method's docstring, then the docstrings of its own base classes (a family of methods such
    as ptq/qat writes what its members share once, on their common base), up to ``Method``."""
    parts = []
    for klass in cls.__mro__:
        if klass.__name__ == "Method" and klass.__module__ == "jpqbench.harness.method":
            break
        if "__doc__" in vars(klass) and klass.__doc__:
            parts.append(inspect.cleandoc(klass.__doc__))
    return "\n\n".join(parts) or "(no docstring)"


def method_section(name: str, cls: type, file: str) -> str:
    """The Markdown section of one registered method."""
    doc = method_doc(cls)
    lines = [f"## {name}", "",
             f"Defined in `{file}` (class `{cls.__name__}`). "
             f"Takes a budget: {_yes_no(cls.takes_budget)}; trains: {_yes_no(cls.trains)}; "
             f"runs distributed (torchrun): {_yes_no(cls.distributed)}.", "",
             rest_to_markdown(doc), "", "### Hyperparameters", ""]
    fields = cls.Hparams.model_fields
    if fields:
        lines += ["| name | type | default | description |", "|---|---|---|---|"]
        for field_name, field in fields.items():
            description = rest_to_markdown(field.description or "")
            lines.append(f"| `{field_name}` | {_cell('`' + _type_name(field.annotation) + '`')} | "
                         f"{_cell('`' + _default(field) + '`')} | {_cell(description)} |")
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def render_method_docs(names: Iterable[str] | None = None) -> str:
    """The Markdown of docs/methods.md: a header, a table of contents and one section per method.

    ``names``: the methods to document (default: every registered one); always in sorted order.
    """
    from jpqbench.base.registry import METHODS

    names = sorted(METHODS.names() if names is None else names)
    classes = {name: METHODS.get(name) for name in names}
    header = [
        f"<!-- generated by `{COMMAND}`; do not edit: edit the method docstrings and regenerate -->",
        "",
        "# Methods",
        "",
        "One section per registered method, generated from its class docstring and its `Hparams` by",
        f"`{COMMAND}`: edit the docstring (`jpqbench/methods/*.py`), not this file,",
        "and regenerate; `tests/methods/test_method_docs.py` fails when the two differ. Every hyperparameter is",
        "set in a config's `method_params` or as a variant `name[key=value]`",
        "([configuration.md](configuration.md)).",
        "",
        "## Contents",
        "",
    ]
    header += [f"- [{name}](#{name}) -- {rest_to_markdown(docstring_summary(cls))}" for name, cls in classes.items()]
    sections = [method_section(name, cls, METHODS.file_of(name)) for name, cls in classes.items()]
    return "\n".join(header) + "\n\n" + "\n".join(sections)
