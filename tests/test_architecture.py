"""Architecture rules for ``core/``: module and function sizes, private imports, import cycles, purity.

The rules are read from the source with :mod:`ast`, so a violation anywhere in ``core/`` fails here with the file,
line and rule named; one more test imports what every ``posvit_cli`` import statement in the repository names, so a
module moved by a split leaves no stale import behind. ``python tests/test_architecture.py [N]`` lists the N
longest functions and every violation. A file another branch is still splitting may be listed, with the reason, in
the allow-lists below (empty on main). Every allow-list entry is itself checked: an entry that no longer violates
its rule fails the test, so the lists cannot go stale.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CORE_DIR = REPO_ROOT / "core"
COMMANDS_DIR = REPO_ROOT / "commands"
CORE_PACKAGE = "posvit_cli.core"

MAX_MODULE_LINES = 800
MAX_FUNCTION_CODE_LINES = 100

# Temporary exceptions, each with its reason (a split under way on another branch), and empty otherwise:
# modules over MAX_MODULE_LINES as "path"; functions over MAX_FUNCTION_CODE_LINES as "path::qualified.name";
# `from posvit_cli.core.X import _name` across modules as "path::_name".
MODULE_SIZE_ALLOWED: set[str] = set()
FUNCTION_SIZE_ALLOWED: set[str] = set()
PRIVATE_IMPORT_ALLOWED: set[str] = set()


def _module_name(path: Path) -> str:
    """Dotted import name of a file under ``core/`` or ``commands/`` as installed (``posvit_cli.core...``)."""
    relative = path.relative_to(REPO_ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return "posvit_cli." + ".".join(parts)


def _python_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.py") if "__pycache__" not in p.parts)


def _relative(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _non_code_lines(source: str, tree: ast.Module) -> set[int]:
    """Line numbers that hold only whitespace, only a comment, or part of a docstring."""
    skipped = {number for number, text in enumerate(source.splitlines(), start=1) if not text.strip()}
    # tokenize, not a text match: a '#' line inside a multi-line string is code.
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and not token.line[: token.start[1]].strip():
            skipped.add(token.start[0])
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    skipped.update(range(first.lineno, first.end_lineno + 1))
    return skipped


def function_code_lengths(path: Path) -> dict[str, tuple[int, int]]:
    """Code lines (no blanks, comments or docstrings) of every function, by qualified name.

    Returns
    -------
    dict
        ``"Class.method"`` / ``"outer.inner"`` -> ``(first line, code line count)``. A nested function's lines
        also count towards its enclosing function, as they are read as part of it.
    """
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    skipped = _non_code_lines(source, tree)
    lengths: dict[str, tuple[int, int]] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                code = sum(1 for n in range(start, child.end_lineno + 1) if n not in skipped)
                lengths[name] = (child.lineno, code)
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return lengths


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """Every absolute import in a file, top-level or inside functions: ``(line, module, imported names)``."""
    found = []
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{_relative(path)}:{node.lineno}: relative import; imports are absolute")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                found.append((node.lineno, alias.name, []))
    return found


def core_import_graph(files: list[Path]) -> dict[str, set[str]]:
    """Edges module -> core modules it imports (``from posvit_cli.core.a import b`` counts ``a.b`` if a module)."""
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for _, imported, names in _imports(path):
            if not imported.startswith(CORE_PACKAGE):
                continue
            targets = [f"{imported}.{n}" for n in names if f"{imported}.{n}" in modules]
            if len(targets) < len(names) or not names:
                targets.append(imported)
            for target in targets:
                # An `__init__` only re-exports; importing a package must not hide the module it re-exports from.
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def module_size_violations(files: list[Path]) -> set[str]:
    return {_relative(p) for p in files if len(p.read_text(encoding="utf-8").splitlines()) > MAX_MODULE_LINES}


def function_size_violations(files: list[Path]) -> dict[str, int]:
    found = {}
    for path in files:
        for name, (_, code) in function_code_lengths(path).items():
            if code > MAX_FUNCTION_CODE_LINES:
                found[f"{_relative(path)}::{name}"] = code
    return found


def private_import_violations(files: list[Path]) -> dict[str, int]:
    """``from posvit_cli.core.X import _name`` where X is not the importing module; ``path::_name`` -> line."""
    found = {}
    for path in files:
        own = _module_name(path)
        for line, imported, names in _imports(path):
            if not imported.startswith(CORE_PACKAGE) or imported == own:
                continue
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    found[f"{_relative(path)}::{name}"] = line
    return found


CORE_FILES = _python_files(CORE_DIR)
CORE_AND_COMMAND_FILES = CORE_FILES + _python_files(COMMANDS_DIR)


def test_rules_see_the_whole_core_package():
    # A walk that found nothing would pass every rule below.
    assert len(CORE_FILES) > 40
    assert any(p.name == "segmenter.py" for p in CORE_FILES)


def test_no_module_over_the_line_limit():
    violations = module_size_violations(CORE_AND_COMMAND_FILES)
    new = sorted(violations - MODULE_SIZE_ALLOWED)
    assert not new, f"modules over {MAX_MODULE_LINES} lines (split them by concern): {new}"
    stale = sorted(MODULE_SIZE_ALLOWED - violations)
    assert not stale, f"allow-listed modules now within {MAX_MODULE_LINES} lines; remove them from the list: {stale}"


def test_no_function_over_the_code_line_limit():
    violations = function_size_violations(CORE_FILES)
    new = {name: n for name, n in violations.items() if name not in FUNCTION_SIZE_ALLOWED}
    assert not new, f"functions over {MAX_FUNCTION_CODE_LINES} code lines (split into named steps): {new}"
    stale = sorted(FUNCTION_SIZE_ALLOWED - set(violations))
    assert not stale, f"allow-listed functions now short enough; remove them from the list: {stale}"


def test_no_private_imports_across_modules():
    violations = private_import_violations(CORE_AND_COMMAND_FILES)
    new = {name: line for name, line in violations.items() if name not in PRIVATE_IMPORT_ALLOWED}
    assert not new, f"private names imported from another module (make them public): {new}"
    stale = sorted(PRIVATE_IMPORT_ALLOWED - set(violations))
    assert not stale, f"allow-listed private imports are gone; remove them from the list: {stale}"


def test_no_import_cycles_among_core_modules():
    cycles = find_cycles(core_import_graph(CORE_FILES))
    assert not cycles, f"import cycles among core modules: {cycles}"


@pytest.mark.parametrize("path", CORE_FILES, ids=_relative)
def test_core_never_imports_the_cli_stack_nor_prints(path):
    for line, imported, _ in _imports(path):
        top = imported.split(".")[0]
        assert top not in {"typer", "rich", "click"}, f"{_relative(path)}:{line} imports {imported}"
        assert not imported.startswith(("posvit_cli.commands", "posvit_cli.app", "posvit_cli._cli")), (
            f"{_relative(path)}:{line}: core imports the command layer ({imported})"
        )
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            raise AssertionError(f"{_relative(path)}:{node.lineno} calls print; report through a progress callback")


def _posvit_imports(path: Path, source: str | None = None) -> list[tuple[int, str, list[str]]]:
    tree = ast.parse(path.read_text(encoding="utf-8") if source is None else source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("posvit_cli"):
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("posvit_cli")]
    return found


def _markdown_python_blocks(path: Path) -> list[str]:
    blocks, current = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        if current is None and line.strip() == "```python":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_every_posvit_import_in_the_repository_resolves():
    """Every ``posvit_cli`` import, top-level or inside a function, in code, tests, examples, benchmarks and the
    Python examples of the docs names a module or attribute that exists: modules moved by a split leave no stale
    import behind (function-level imports would otherwise only fail when that code path runs)."""
    import importlib

    sources = []
    for folder in ("core", "commands", "posvit_cli", "tests", "examples", "benchmarks"):
        sources += [(p, None) for p in _python_files(REPO_ROOT / folder)]
    for doc in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
                *sorted((REPO_ROOT / "examples").glob("*.md"))]:
        sources += [(doc, block) for block in _markdown_python_blocks(doc)]
    checked, broken = 0, []
    for path, block in sources:
        for line, module, names in _posvit_imports(path, block):
            try:
                imported = importlib.import_module(module)
            except ImportError as exc:
                broken.append(f"{_relative(path)}:{line}: {module} ({exc})")
                continue
            for name in names:
                checked += 1
                if name == "*" or hasattr(imported, name):
                    continue
                try:
                    importlib.import_module(f"{module}.{name}")
                except ImportError:
                    broken.append(f"{_relative(path)}:{line}: {module} has no {name}")
    assert checked > 200
    assert not broken, "stale imports:\n" + "\n".join(broken)


# --- the checker's own known answers: each rule must fire on a planted violation -------------------------------


def _plant(tmp_path: Path, relative: str, source: str) -> Path:
    path = tmp_path / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source, encoding="utf-8")
    return path


def test_checker_counts_code_lines_without_docstring_comments_or_blanks(tmp_path):
    body = "\n".join(f"    x{i} = {i}  # why" for i in range(7))
    source = (f'def f():\n    """Doc.\n\n    More doc.\n    """\n    # a comment\n\n{body}\n'
              '    s = """\n# inside a string\n"""\n    return 1\n')
    path = _plant(tmp_path, "core/a.py", source)
    # def line + 7 assignments + 3 lines of the string (its '#' line is code) + return = 12
    assert function_code_lengths(path) == {"f": (1, 12)}


def test_checker_finds_a_planted_long_function_big_module_private_import_and_cycle(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO_ROOT", tmp_path)
    long_body = "\n".join(f"    v{i} = {i}" for i in range(MAX_FUNCTION_CODE_LINES + 1))
    a = _plant(tmp_path, "core/pkg/a.py", f"from posvit_cli.core.pkg.b import _hidden\n\ndef long():\n{long_body}\n")
    b = _plant(
        tmp_path,
        "core/pkg/b.py",
        "def _hidden():\n    from posvit_cli.core.pkg import a\n" + "\n" * MAX_MODULE_LINES,
    )
    c = _plant(tmp_path, "core/pkg/c.py", "from posvit_cli.core.pkg.a import long\n")
    files = [a, b, c]
    assert function_size_violations(files) == {"core/pkg/a.py::long": MAX_FUNCTION_CODE_LINES + 2}
    assert module_size_violations(files) == {"core/pkg/b.py"}
    assert private_import_violations(files) == {"core/pkg/a.py::_hidden": 1}
    assert find_cycles(core_import_graph(files)) == [["posvit_cli.core.pkg.a", "posvit_cli.core.pkg.b"]]


if __name__ == "__main__":
    # `python tests/test_architecture.py [N]`: the N longest functions of core/ in code lines, and every violation.
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    lengths = [(code, f"{_relative(p)}:{line} {name}") for p in CORE_FILES
               for name, (line, code) in function_code_lengths(p).items()]
    for code, where in sorted(lengths, reverse=True)[:count]:
        sys.stdout.write(f"{code:5d}  {where}\n")
    sys.stdout.write(f"modules over {MAX_MODULE_LINES} lines: {sorted(module_size_violations(CORE_FILES))}\n")
    sys.stdout.write(f"private imports: {private_import_violations(CORE_AND_COMMAND_FILES)}\n")
    sys.stdout.write(f"import cycles: {find_cycles(core_import_graph(CORE_FILES))}\n")
