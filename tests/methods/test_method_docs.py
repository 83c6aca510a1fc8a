"""docs/methods.md is generated from the method docstrings and hyperparameters, and is up to date."""
from __future__ import annotations

import pytest
from paths import REPO_ROOT

from jpqbench.base.registry import METHODS
from jpqbench.pipeline.method_docs import COMMAND, render_method_docs, rest_to_markdown

DOCS = REPO_ROOT / "docs" / "methods.md"


def _builtin_methods() -> list[str]:
    """The methods of jpqbench/methods/: what docs/methods.md documents (a user's plugin folder or an
    installed third-party method, registered in this process, is not part of the repository's page)."""
    return [name for name in METHODS.names() if METHODS.file_of(name).startswith("jpqbench/methods/")]


@pytest.fixture(scope="module")
def rendered() -> str:
    return render_method_docs(_builtin_methods())


def test_docs_methods_md_is_the_generated_page(rendered: str) -> None:
    committed = DOCS.read_text(encoding="utf-8") if DOCS.exists() else ""
    assert committed == rendered, (f"docs/methods.md is out of date with the method docstrings: regenerate it "
                                   f"with `{COMMAND}` (with no JPQBENCH_PLUGIN_PATH plugins)")


def test_every_registered_method_has_a_section_with_every_hyperparameter(rendered: str) -> None:
    names = _builtin_methods()
    assert {"fp32", "ptq", "qat", "prune", "prune_then_quantize", "quantize_then_prune", "geta", "djpq", "cwmpq",
            "ajpq", "noncomm"} <= set(names)
    sections = rendered.split("\n## ")[1:]
    by_name = {section.split("\n", 1)[0]: section for section in sections}
    for name in names:
        assert name in by_name, f"no section for {name}"
        section = by_name[name]
        assert f"`{METHODS.file_of(name)}`" in section
        for field in METHODS.get(name).Hparams.model_fields:
            assert f"| `{field}` |" in section, f"{name}: hyperparameter {field} is missing"
    assert list(by_name) == ["Contents", *sorted(names)]  # one section each, in sorted order


def test_render_is_deterministic() -> None:
    assert render_method_docs(_builtin_methods()) == render_method_docs(reversed(_builtin_methods()))


def test_every_method_of_the_registry_is_rendered_by_default() -> None:
    rendered = render_method_docs()
    for name in METHODS.names():
        assert f"\n## {name}\n" in rendered


@pytest.mark.parametrize("rest, markdown", [
    ("``x = 1``", "`x = 1`"),
    (":class:`Foo`, :func:`bar`, :mod:`a.b`, :meth:`~C.m`", "`Foo`, `bar`, `a.b`, `C.m`"),
    ("*emphasis* and **strong**", "*emphasis* and **strong**"),
    ("H*W and a * b", r"H\*W and a \* b"),
    ("``H*W`` stays", "`H*W` stays"),
    ("* a list item\n  continued", "* a list item\n  continued"),
])
def test_rest_to_markdown(rest: str, markdown: str) -> None:
    assert rest_to_markdown(rest) == markdown


def test_markdown_is_refused_for_anything_but_methods(capsys: pytest.CaptureFixture[str]) -> None:
    from jpqbench.pipeline.cli import main

    assert main(["list", "datasets", "--markdown"]) == 2
    assert "--markdown" in capsys.readouterr().err


def test_cli_prints_the_page(capsys: pytest.CaptureFixture[str]) -> None:
    from jpqbench.pipeline.cli import main

    assert main(["list", "methods", "--markdown"]) == 0
    assert capsys.readouterr().out == render_method_docs()
