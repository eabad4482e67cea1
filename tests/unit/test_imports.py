"""Import hygiene: every module of the product and of the harness imports on its own in a fresh
interpreter; the node (raftsql.server) does not reach into the driver's private modules; the
product never imports the test harness (raftsql.testing); and the harness's old homes inside
the product are gone."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import raftsql
import raftsql.driver
import raftsql.server

PACKAGES = (raftsql, raftsql.server, raftsql.driver)


def _modules() -> list[str]:
    """Every module and package of raftsql (raft, sim, testing, ...), raftsql.server and
    raftsql.driver. walk_packages imports the packages (not the modules) to find their
    children; raftsql.server and raftsql.driver live outside raftsql/ (package-dir), so each
    is walked on its own."""
    names = set()
    for pkg in PACKAGES:
        names.add(pkg.__name__)
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            names.add(info.name)
    return sorted(names)


MODULES = _modules()

# Run in a fresh interpreter that has imported nothing but os and sys: each module is imported
# in its own forked child, so no module is helped by another's imports, and the interpreter
# starts once instead of once per module. A failing child writes its traceback to OUT/<name>.
_IMPORT_EACH = r"""
import os, sys
out = sys.argv[1]
for name in sys.argv[2:]:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            __import__(name)
        except BaseException:
            import traceback
            with open(os.path.join(out, name), "w") as f:
                f.write(traceback.format_exc())
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(name, status, flush=True)
"""


@pytest.fixture(scope="module")
def import_each(tmp_path_factory) -> dict[str, str]:
    """{module: "" if it imported on its own, else why not}."""
    out = tmp_path_factory.mktemp("imports")
    r = subprocess.run([sys.executable, "-c", _IMPORT_EACH, str(out), *MODULES], cwd=out,
                       capture_output=True, text=True, timeout=300)
    statuses = dict(line.rsplit(" ", 1) for line in r.stdout.splitlines() if line.strip())
    results = {}
    for name in MODULES:
        if name not in statuses:
            results[name] = f"the import run stopped before {name}: rc={r.returncode}\n{r.stderr}"
        elif statuses[name] != "0":
            err = out / name
            results[name] = err.read_text() if err.exists() else f"child wait status {statuses[name]}"
        else:
            results[name] = ""
    return results


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_on_its_own(module, import_each):
    assert import_each[module] == "", f"import {module} in a fresh interpreter failed:\n{import_each[module]}"


def test_discovery_finds_every_package():
    for name in ("raftsql.raft", "raftsql.sim", "raftsql.testing", "raftsql.testing.checker",
                 "raftsql.server.node", "raftsql.driver._client"):
        assert name in MODULES


# --------------------------------------------------------------------------- who imports what


def _source_files(pkg) -> dict[str, Path]:
    """{module name: file} for every .py file under a package's directory."""
    root = Path(pkg.__path__[0])
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join([pkg.__name__, *parts])] = path
    return files


def imported_names(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module name that source (the text of `module`) may import, anywhere in the file
    (function-level imports too), with relative imports made absolute. For `from X import a`
    both X and X.a are listed: a may be a submodule."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def _driver_internals(names: set[str]) -> list[str]:
    """The driver's private modules (raftsql.driver._*) among names."""
    return sorted({".".join(n.split(".")[:3]) for n in names
                   if n.startswith("raftsql.driver._")})


def test_the_scan_sees_driver_internals():
    """The scan below must be able to fail: every spelling of such an import is caught."""
    src = ("import raftsql.driver._client\n"
           "from raftsql.driver._tls import client_context\n"
           "def f():\n    from raftsql.driver import _admin\n"
           "from ..driver._conn import DSN\n"
           "from ..driver import connect\n")
    found = _driver_internals(imported_names(src, "raftsql.server.x"))
    assert found == ["raftsql.driver._admin", "raftsql.driver._client", "raftsql.driver._conn",
                     "raftsql.driver._tls"]


def test_server_does_not_import_driver_internals():
    """The node talks to other nodes through raftsql/ (clientconn, tlsconfig, protocol), never
    through the driver's private modules."""
    bad = []
    for module, path in _source_files(raftsql.server).items():
        found = _driver_internals(imported_names(path.read_text(), module, path.name == "__init__.py"))
        if found:
            bad.append(f"{path}: {', '.join(found)}")
    assert not bad, "server/ imports driver internals:\n" + "\n".join(bad)


def test_product_never_imports_the_harness():
    bad = []
    for pkg in PACKAGES:
        for module, path in _source_files(pkg).items():
            if module == "raftsql.testing" or module.startswith("raftsql.testing."):
                continue
            found = sorted(n for n in imported_names(path.read_text(), module, path.name == "__init__.py")
                           if n == "raftsql.testing" or n.startswith("raftsql.testing."))
            if found:
                bad.append(f"{path}: {', '.join(found)}")
    assert not bad, "the product imports the test harness:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", ["raftsql.server.faults", "raftsql.server.testing", "raftsql.checker"])
def test_old_harness_homes_are_gone(module):
    """The harness moved to raftsql.testing (cluster, proxy, nemesis, ..., checker); no shim
    stays behind at the old paths."""
    assert importlib.util.find_spec(module) is None
    with pytest.raises(ModuleNotFoundError) as e:
        importlib.import_module(module)
    assert e.value.name == module
