"""The layering rule of docs/architecture.md: each module imports only from modules listed above it.

The order is the modules table of docs/architecture.md, parsed from the file (one module, or the
`sources/` package, per row); the imports are every module's `import` statements parsed with `ast`:
relative and absolute `cxr_dist` imports, at the top of the file or inside functions. Imports
between the modules of the `sources/` package count as one row importing itself (allowed).
Dynamic imports by name (cli.py's `importlib.import_module` of each sub-command) are not seen:
cli.py is the last row for that reason.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cxr_dist"
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("sources",)  # sub-packages: one row each


def row_of(dotted: str) -> str:
    """`cxr_dist.x[.y]` -> the table row that holds it: `x` (a module or a sub-package), or
    `__init__` for the package itself (`from cxr_dist import __version__`)."""
    parts = dotted.split(".")
    assert parts[0] == "cxr_dist", dotted
    return parts[1] if len(parts) > 1 else "__init__"


def is_module(dotted: str, package: Path = PACKAGE) -> bool:
    path = package.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def modules() -> dict[str, Path]:
    """Every module file of the package, by dotted name."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 2:
            parts = parts[:-1]  # cxr_dist/sources/__init__.py is cxr_dist.sources
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


def table_order() -> list[str]:
    """Rows of the modules table in docs/architecture.md, top to bottom: `log.py` -> `log`,
    `sources/` -> `sources`, `__init__.py` -> `__init__`."""
    rows, in_table = [], False
    for line in DOC.read_text().splitlines():
        if line.startswith("| module |"):
            in_table = True
            continue
        if in_table:
            if not line.startswith("|"):
                break
            cell = line.split("|")[1].strip()
            if set(cell) <= {"-", " "}:
                continue
            names = re.findall(r"`([\w/]+?)(?:\.py|/)`", cell)
            assert len(names) == 1, f"one module per row of the table, not {cell!r}"
            rows.append(names[0])
    return rows


def test_the_table_lists_every_module_once():
    order = table_order()
    assert len(order) == len(set(order)), f"listed twice: {[m for m in order if order.count(m) > 1]}"
    have = {row_of(m) for m in modules()}
    assert not have - set(order), f"modules missing from the table in docs/architecture.md: {sorted(have - set(order))}"
    assert not set(order) - have, f"the table lists modules that do not exist: {sorted(set(order) - have)}"


def test_each_module_imports_only_from_modules_above_it():
    order = table_order()
    rank = {name: i for i, name in enumerate(order)}
    wrong = []
    for dotted, path in modules().items():
        me = row_of(dotted)
        for dep in sorted(imported(dotted, path)):
            them = row_of(dep)
            if them == me:
                continue
            if me not in rank or them not in rank:
                missing = me if me not in rank else them
                wrong.append(f"{path.relative_to(ROOT)} imports {dep}: {missing} is not in the table")
            elif rank[them] > rank[me]:
                wrong.append(f"{path.relative_to(ROOT)} imports {dep} ({them} is listed below {me})")
    assert not wrong, "imports against the order of docs/architecture.md:\n" + "\n".join(wrong)


def test_the_parser_sees_every_kind_of_import(tmp_path):
    """The checker itself: relative, absolute, package-level and function-local imports."""
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
    assert {row_of(m) for m in found} == {"a", "b", "c", "__init__", "d", "sub"}
    assert imported("cxr_dist.sub.x", src / "sub" / "x.py", src) == {"cxr_dist.a", "cxr_dist.sub"}
