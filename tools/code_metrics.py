"""The size and complexity of the library's code, against the targets in docs/architecture.md.

Run ``python -m tools.code_metrics`` (radon comes with the ``dev`` extra). It prints, for the
``newt`` package: the largest module (lines), the largest function (lines, decorators and
docstring included), the largest cyclomatic complexity outside ``newt/_kernels.py`` (whose
tensor kernels branch on dtypes and devices by design), the class with the most instance
attributes (names assigned as ``self.<name>`` in its own methods), and radon's maintainability
grade of every module. ``--check`` exits with 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

from radon.complexity import cc_visit
from radon.metrics import mi_rank, mi_visit

PACKAGE = Path(__file__).resolve().parent.parent / "newt"
TARGETS = {"module lines": 400, "function lines": 50, "complexity": 12, "instance attributes": 12}
EXEMPT_FROM_COMPLEXITY = {"_kernels.py"}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _functions(tree: ast.AST) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            found.append((node.name, node.end_lineno - first + 1))
    return found


def _instance_attributes(tree: ast.AST) -> list[tuple[str, int]]:
    found = []
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        names = set()
        for node in ast.walk(cls):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Name)
                    and target.value.id == "self"
                ):
                    names.add(target.attr)
        found.append((cls.name, len(names)))
    return found


def measure() -> dict[str, tuple[int, str]]:
    """Each metric's worst value and where it is."""
    worst = {name: (0, "") for name in TARGETS}
    grades = []
    for path in _modules():
        source = path.read_text()
        name = str(path.relative_to(PACKAGE.parent))
        tree = ast.parse(source)
        lines = len(source.splitlines())
        worst["module lines"] = max(worst["module lines"], (lines, name))
        for function, length in _functions(tree):
            worst["function lines"] = max(worst["function lines"], (length, f"{name}:{function}"))
        if path.name not in EXEMPT_FROM_COMPLEXITY:
            for block in cc_visit(source):
                worst["complexity"] = max(worst["complexity"], (block.complexity, f"{name}:{block.name}"))
        for cls, count in _instance_attributes(tree):
            worst["instance attributes"] = max(worst["instance attributes"], (count, f"{name}:{cls}"))
        grades.append((mi_rank(mi_visit(source, multi=True)), name))
    worst["maintainability"] = (max(grade for grade, _ in grades), ", ".join(n for g, n in grades if g != "A"))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit with 1 when a target is missed")
    args = parser.parse_args()
    worst = measure()
    missed = []
    print("| metric | worst | where | target |")
    print("|---|---:|---|---:|")
    for metric, (value, where) in worst.items():
        target = TARGETS.get(metric, "A")
        print(f"| {metric} | {value} | {where or 'every module'} | {target} |")
        if (metric in TARGETS and value > target) or (metric == "maintainability" and value != "A"):
            missed.append(metric)
    if args.check and missed:
        sys.exit(f"missed: {', '.join(missed)}")


if __name__ == "__main__":
    main()
