"""The shape of the code: no import cycles, options read from the typed config, a thin entry point."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import woodfisher
import woodfisher_kernels

PACKAGES = {"woodfisher": Path(woodfisher.__file__).parent,
            "woodfisher_kernels": Path(woodfisher_kernels.__file__).parent}


def _modules():
    """{dotted module name: path} of every .py file of both packages."""
    out = {}
    for pkg, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [pkg, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules) -> set:
    """Modules of the two packages that ``name`` imports anywhere in its file (late imports included)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                head = ".".join(base[: len(base) - node.level + 1])
                mod = f"{head}.{node.module}" if node.module else head
            else:
                mod = node.module
            for alias in node.names:  # `from pkg import submodule` imports the submodule, else pkg itself
                sub = f"{mod}.{alias.name}"
                found.add(sub if sub in modules else mod)
    return {m for m in found if m in modules and m != name}


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_options_are_read_from_the_config_not_a_dict():
    """No ``a["..."]``-style option reads left in the pruner."""
    offenders = []
    for name, path in _modules().items():
        if not name.startswith("woodfisher."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in ("a", "args") \
                    and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


def test_prune_one_shot_is_a_thin_entry_point():
    source = inspect.getsource(woodfisher.prune_one_shot)
    body = ast.parse(source).body[0].body
    code = body[1:] if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) else body
    lines = sum(n.end_lineno - n.lineno + 1 for n in code)
    assert lines <= 40, f"prune_one_shot has {lines} lines of code"


@pytest.mark.parametrize("name", sorted(woodfisher.METHODS))
def test_every_method_is_registered_once_with_its_protocol(name):
    method = woodfisher.METHODS[name]
    assert method.name == name
    assert method.curvature in ("none", "blockwise", "diagonal", "kfac")
    assert set(method.patterns) <= {"nm", "rows"} and method.summary
    from woodfisher.cli import build_parser
    prune = [a for a in build_parser()._subparsers._group_actions[0].choices["prune"]._actions
             if a.dest == "method"][0]
    assert name in prune.choices
