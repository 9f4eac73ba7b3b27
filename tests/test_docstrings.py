"""The public API documents its arguments, results and errors (the project's docstring standard).

Walks every name a user reaches by the documented imports (``woodfisher_kernels.__all__``, its
``testing`` helpers, ``woodfisher.__all__`` and the submodules README.md imports from) and checks,
by introspection, that each function, class and public method has:

- an ``Args:`` section when it takes arguments (besides ``self`` / ``cls``); a dataclass or
  NamedTuple may document its fields (its constructor's arguments) as ``Attributes:`` instead;
- a ``Returns:`` (or ``Yields:``) section when its body returns a value;
- a ``Raises:`` section when its body raises, or calls one of the argument checks
  (``check_*`` / ``_check_*`` helpers, whose every failure is a ValueError).

Exceptions are listed in ``EXEMPT`` with the reason.
"""
from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

import woodfisher
import woodfisher.diagnostics
import woodfisher.export
import woodfisher.memory
import woodfisher.pai
import woodfisher.tuning
import woodfisher_kernels
import woodfisher_kernels.testing

MODULES = {
    "woodfisher_kernels": woodfisher_kernels,
    "woodfisher_kernels.testing": woodfisher_kernels.testing,
    "woodfisher": woodfisher,
    "woodfisher.export": woodfisher.export,
    "woodfisher.pai": woodfisher.pai,
    "woodfisher.memory": woodfisher.memory,
    "woodfisher.diagnostics": woodfisher.diagnostics,
    "woodfisher.tuning": woodfisher.tuning,
}

#: "module.Name[.method]": (section, reason) pairs a name may lack.
EXEMPT: dict = {
    # none today; e.g. "woodfisher.x.f": ("Raises", "why f's raise never reaches the user")
}

SECTIONS_RETURN = ("Returns:", "Yields:")


def _public_objects():
    seen = set()
    for mod_name, mod in MODULES.items():
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or id(obj) in seen:
                continue
            seen.add(id(obj))
            qual = f"{mod_name}.{name}"
            yield qual, obj
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if attr.startswith("_"):
                        continue
                    func = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
                    if inspect.isfunction(func):
                        yield f"{qual}.{attr}", func


def _own_nodes(func_node):
    """The AST nodes of ``func_node``'s own body (nested functions, lambdas and classes excluded)."""
    stack = list(func_node.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _func_ast(func):
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return None
    tree = ast.parse(source)
    return next(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _is_check_call(node) -> bool:
    if not isinstance(node, ast.Call):
        return False
    fn = node.func
    name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
    return name.startswith(("check_", "_check_"))


def _needs(func):
    """Which sections ``func`` needs: {"Args", "Returns", "Raises"}."""
    needs = set()
    params = [p for p in inspect.signature(func).parameters if p not in ("self", "cls")]
    if params:
        needs.add("Args")
    node = _func_ast(func)
    if node is None:
        return needs
    own = list(_own_nodes(node))
    if any(isinstance(n, ast.Return) and n.value is not None
           and not (isinstance(n.value, ast.Constant) and n.value.value is None) for n in own):
        needs.add("Returns")
    if any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in own):
        needs.add("Returns")
    if any(isinstance(n, ast.Raise) or _is_check_call(n) for n in own):
        needs.add("Raises")
    return needs


def _is_record(obj) -> bool:
    return inspect.isclass(obj) and (hasattr(obj, "__dataclass_fields__") or hasattr(obj, "_fields"))


def _cases():
    for qual, obj in _public_objects():
        if inspect.isclass(obj):
            init = vars(obj).get("__init__")
            # a class documents its constructor's arguments (or its fields) in the class docstring
            needs = _needs(init) - {"Returns"} if inspect.isfunction(init) else set()
            if not inspect.isfunction(init) and getattr(obj, "__dataclass_fields__", None):
                needs = {"Args"}
            yield qual, obj, needs
        else:
            yield qual, obj, _needs(obj)


CASES = list(_cases())


def test_walk_finds_the_public_api():
    names = {qual for qual, _, _ in CASES}
    for expected in ("woodfisher_kernels.fisher_inverse", "woodfisher_kernels.obs_update",
                     "woodfisher.prune_one_shot", "woodfisher.PruneConfig", "woodfisher.export.to_sparse",
                     "woodfisher.pai.prune_at_init", "woodfisher.search_damp", "woodfisher.Curvature.with_damp",
                     "woodfisher.GradualPruner.step", "woodfisher_kernels.LowRankInverse.matvec"):
        assert expected in names
    assert len(CASES) > 80


def test_exemptions_are_still_needed():
    for qual, (section, _reason) in EXEMPT.items():
        obj = next(o for q, o, _ in CASES if q == qual)
        assert f"{section}:" not in (inspect.getdoc(obj) or ""), f"{qual} documents {section}: drop its exemption"


@pytest.mark.parametrize("qual,obj,needs", CASES, ids=[c[0] for c in CASES])
def test_public_docstring_sections(qual, obj, needs):
    doc = inspect.getdoc(obj) or ""
    assert doc.strip(), f"{qual} has no docstring"
    exempt = EXEMPT.get(qual, (None,))[0]
    missing = []
    for section in sorted(needs):
        if section == exempt:
            continue
        heads = SECTIONS_RETURN if section == "Returns" else (f"{section}:",)
        if section == "Args" and _is_record(obj):
            heads = ("Args:", "Attributes:")
        if not any(h in doc for h in heads):
            missing.append(section)
    assert not missing, f"{qual}: docstring lacks {', '.join(s + ':' for s in missing)}"
