"""The layering rule of docs/architecture.md, checked over packages.

`cxr_dist` is a stack of stages, each a sub-package; a module imports only from its own stage and
the stages below it:

    root (errors, log, fileio, config, dist) < data < model < eval < product < runs < train < cli

Imports are every module's `import` statements parsed with `ast` (relative and absolute, at the
top of a file or inside a function). Within a stage any module may import any other, but the
modules of the whole package must form no cycle. cli.py imports each sub-command by name
(`importlib.import_module`), which `ast` does not see: it is the top of the stack for that reason.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cxr_dist"
DOC = ROOT / "docs" / "architecture.md"
ROOT_MODULES = ("__init__", "errors", "log", "fileio", "config", "dist")
STAGES = ("root", "data", "model", "eval", "product", "runs", "train", "cli")


def stage_of(dotted: str) -> str:
    """`cxr_dist.data.stream` -> "data"; `cxr_dist.config` -> "root"; `cxr_dist.cli` -> "cli"."""
    parts = dotted.split(".")
    assert parts[0] == "cxr_dist", dotted
    if len(parts) == 1 or parts[1] in ROOT_MODULES:
        return "root"
    return parts[1]


def is_module(dotted: str, package: Path = PACKAGE) -> bool:
    path = package.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module file of the package, by dotted name (a package's __init__ by the package's name)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported(dotted: str, path: Path, package_dir: Path = PACKAGE) -> set[str]:
    """The cxr_dist modules that `path` (module `dotted`) imports, anywhere in the file."""
    package = dotted if path.name == "__init__.py" else dotted.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "cxr_dist"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            elif node.module and node.module.split(".")[0] == "cxr_dist":
                base = node.module
            else:
                continue
            # `from . import dist` imports a module; `from . import __version__` a name of the package.
            out |= {f"{base}.{a.name}" if is_module(f"{base}.{a.name}", package_dir) else base for a in node.names}
    return out


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    mods = modules(package)
    return {d: imported(d, p, package) - {d} for d, p in mods.items()}


def test_every_module_belongs_to_a_known_stage():
    unknown = sorted({stage_of(m) for m in modules()} - set(STAGES))
    assert not unknown, f"sub-packages missing from the stack {STAGES}: {unknown} (and from docs/architecture.md)"


def test_each_stage_imports_only_from_itself_and_the_stages_below():
    rank = {s: i for i, s in enumerate(STAGES)}
    wrong = []
    for dotted, deps in graph().items():
        for dep in sorted(deps):
            if rank[stage_of(dep)] > rank[stage_of(dotted)]:
                wrong.append(f"{dotted} imports {dep}: {stage_of(dep)} is above {stage_of(dotted)}")
    assert not wrong, "imports against the stack of docs/architecture.md:\n" + "\n".join(wrong)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """A cycle of module imports, or None. A package's __init__ importing its own modules is not a
    cycle with them (importing `pkg.mod` runs `pkg/__init__` first by Python's rules, not by code)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(g.get(m, ())):
            if dep.startswith(m + "."):  # a package importing its own module
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if state.get(dep) is None and (found := visit(dep)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if state.get(m) is None and (found := visit(m)):
            return found
    return None


def test_no_module_imports_form_a_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_stage_says_what_it_holds_and_may_import():
    for stage in STAGES:
        if stage in ("root", "cli"):
            continue
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text())) or ""
        assert "May import" in doc, f"cxr_dist/{stage}/__init__.py: its docstring should say what it may import"
        for path in sorted((PACKAGE / stage).glob("*.py")):
            if path.stem not in ("__init__", "__main__"):
                assert path.stem in doc, f"cxr_dist/{stage}/__init__.py does not mention its module {path.stem}"


def test_architecture_doc_names_every_module():
    text = DOC.read_text()
    missing = [str(p.relative_to(PACKAGE)) for d, p in modules().items()
               if p.name not in ("__init__.py", "__main__.py") and str(p.relative_to(PACKAGE)) not in text]
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_the_checker_sees_every_kind_of_import_and_cycle(tmp_path):
    """The checker itself: relative, absolute, package-level and function-local imports; cycles."""
    src = tmp_path / "cxr_dist"
    (src / "sub").mkdir(parents=True)
    for name in ("__init__.py", "a.py", "b.py", "c.py", "d.py", "sub/__init__.py", "sub/x.py"):
        (src / name).write_text("")
    (src / "e.py").write_text(
        "from . import a\nfrom .b import thing\nimport cxr_dist.c\nfrom cxr_dist import __version__\n"
        "def f():\n    from .d import y\n    from .sub import x\n")
    (src / "sub" / "x.py").write_text("from ..a import z\nfrom . import y_name\n")
    found = imported("cxr_dist.e", src / "e.py", src)
    assert found == {"cxr_dist.a", "cxr_dist.b", "cxr_dist.c", "cxr_dist", "cxr_dist.d", "cxr_dist.sub.x"}
    assert {stage_of(m) for m in found} == {"root", "a", "b", "c", "d", "sub"}
    assert imported("cxr_dist.sub.x", src / "sub" / "x.py", src) == {"cxr_dist.a", "cxr_dist.sub"}
    assert find_cycle({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": set()}) is None
    assert find_cycle({"p.a": {"p.b"}, "p.b": {"p.a"}}) == ["p.a", "p.b", "p.a"]
    assert find_cycle({"p": {"p.x"}, "p.x": {"p"}}) is None  # a package and its own module
