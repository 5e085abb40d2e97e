"""The docs' code examples run: every ```python block of the README and of docs/.

The blocks of a page run in order in one namespace (a later block may use what an earlier one
defined), which starts with what a snippet of a training loop takes for granted: a small model,
a few batches, a loss function and a logger. A block that cannot run that way (it needs
Lightning, transformers, torchrun or a GPU, or is a fragment) is preceded by the line
``<!-- example: not run -->`` and is only checked to be valid Python.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest
import torch

import newt

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOT_RUN = "<!-- example: not run -->"
FENCE = re.compile(r"^```python\s*$(.*?)^```\s*$", re.M | re.S)


def _pages() -> list[pathlib.Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _blocks(page: pathlib.Path) -> list[tuple[int, str, bool]]:
    """``(line, source, run)`` of each python block of ``page``."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        line = text.count("\n", 0, match.start()) + 1
        found.append((line, match.group(1), not (before and before[-1].strip() == NOT_RUN)))
    return found


def _namespace() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(64, 8)
    y = x[:, :1] * 2.0 - x[:, 1:2]
    loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    return {
        "torch": torch,
        "nn": torch.nn,
        "newt": newt,
        "Newt": newt.Newt,
        "model": model,
        "loader": loader,
        "loss_fn": torch.nn.functional.mse_loss,
        "log": lambda *args, **kwargs: None,
    }


PAGES = [page for page in _pages() if _blocks(page)]


def test_the_docs_have_examples_that_run():
    assert sum(run for page in PAGES for _, _, run in _blocks(page)) >= 10


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_the_examples_of_a_page(page: pathlib.Path) -> None:
    namespace = _namespace()
    for line, source, run in _blocks(page):
        where = f"{page.relative_to(ROOT)}:{line}"
        tree = ast.parse(source, filename=where)  # every block is valid Python, run or not
        if run:
            try:
                exec(compile(tree, where, "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"the example at {where} raised {error!r}") from error


def _documented_defaults() -> dict[str, str]:
    """Each option's row in docs/options.md: the name(s) in the first cell, the default in the second."""
    rows = {}
    for line in (ROOT / "docs" / "options.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            names = [name.strip("` ") for name in cells[0].split(",")]
            values = [value.strip("` ") for value in cells[1].split(",")]
            rows.update(zip(names, values if len(values) == len(names) else values * len(names)))
    return rows


def test_the_options_page_lists_every_field_with_its_default():
    import dataclasses

    documented = _documented_defaults()
    for kind in (newt.Policies, newt.RuleOptions):
        for field in dataclasses.fields(kind):
            assert field.name in documented, f"{kind.__name__}.{field.name} is missing from docs/options.md"
            value = ast.literal_eval(documented[field.name])  # "True", "0.2", "1e4"
            assert value == field.default and type(value) is type(field.default) or (
                isinstance(field.default, float) and float(value) == field.default
            ), f"{field.name}: docs/options.md says {documented[field.name]}, the default is {field.default!r}"
