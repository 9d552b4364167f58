"""The house rules that a linter does not check (GUIDE 6 and 9; issue 14), read from the source by AST.

- An import inside a function is allowed only with a reason on its line: a third-party package that is
  heavy or optional (`# heavy: ...`, `# optional ...`), or, in the command-line modules only, the
  start-up time of a command (`# start-up time: ...`). posttrain's own modules are imported at the top
  everywhere else; a cycle that this reveals is fixed by moving code, not by hiding the import.
- No file in posttrain/ is longer than 300 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "posttrain"
MAX_LINES = 300
# The command-line modules: each command imports its library lazily, so `posttrain --help` stays fast.
CLI_MODULES = {"cli.py", "curate/cli.py", "eval/cli.py"}
REASONS = ("heavy", "optional", "start-up time")


def _is_internal(node: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == "posttrain"
    return any(alias.name.split(".")[0] == "posttrain" for alias in node.names)


def _comment(lines: list[str], node: ast.AST) -> str:
    """The comments on an import statement's lines (a multi-line import may carry it on any)."""
    return " ".join(line.split("#", 1)[1] for line in lines[node.lineno - 1:node.end_lineno] if "#" in line)


def _function_imports(node: ast.AST, inside: bool = False):
    """Every import statement that sits inside a function (methods and nested functions included)."""
    for child in ast.iter_child_nodes(node):
        if inside and isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from _function_imports(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))


def problems(rel: str, text: str) -> list[str]:
    """What in one file of posttrain/ (path relative to the package) breaks the rules above."""
    lines = text.splitlines()
    out = [f"{rel}: {len(lines)} lines (at most {MAX_LINES}): split it by meaning"] if len(lines) > MAX_LINES else []
    for node in _function_imports(ast.parse(text)):
        comment, where = _comment(lines, node).lower(), f"{rel}:{node.lineno}: {lines[node.lineno - 1].strip()}"
        if _is_internal(node):
            if rel not in CLI_MODULES:
                out.append(f"{where}: posttrain's own import inside a function; move it to the top")
            elif "start-up time" not in comment:
                out.append(f"{where}: a command's lazy import needs '# start-up time: ...' on its line")
        elif not any(reason in comment for reason in REASONS):
            out.append(f"{where}: an import inside a function needs its reason on the line "
                       f"('# heavy: ...' or '# optional ...'), else move it to the top")
    return out


def test_posttrain_keeps_the_rules():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += problems(path.relative_to(PACKAGE).as_posix(), path.read_text(encoding="utf-8"))
    assert not found, "\n".join(found)


def test_the_check_catches_each_kind_of_problem():
    lazy = "def f():\n    from posttrain.models import load\n    import torch\n    import yaml  # heavy: x\n"
    found = problems("models/x.py", lazy)
    assert len(found) == 2 and "own import" in found[0] and "needs its reason" in found[1]
    assert len(problems("cli.py", lazy)) == 2  # the cli may import lazily, but only with the reason
    commented = problems("cli.py", lazy.replace("load\n", "load  # start-up time: only what runs\n"))
    assert len(commented) == 1 and "import torch" in commented[0]
    assert problems("models/x.py", "def f():\n    from . import y  # heavy\n")  # relative is internal too
    assert problems("x.py", "class A:\n    def f(self):\n        def g():\n            import torch\n")
    assert not problems("x.py", "import torch\n\n\ndef f():\n    return torch\n")
    assert problems("x.py", "x = 1\n" * (MAX_LINES + 1)) and not problems("x.py", "x = 1\n" * MAX_LINES)
