"""The Raft core must stay a pure state machine: no clock, socket, file, thread or global RNG."""

import ast
import pathlib

import raftsql.raft

CORE_DIR = pathlib.Path(raftsql.raft.__file__).parent
FORBIDDEN_MODULES = {"socket", "threading", "time", "os", "select", "asyncio", "subprocess", "datetime", "ssl"}
# The only thing the core may take from `random` is the Random class (for type hints and for
# the caller to construct); module-level functions share hidden global state.
ALLOWED_RANDOM_ATTRS = {"Random"}


def _core_files():
    files = sorted(CORE_DIR.glob("*.py"))
    assert files, "no core files found"
    return files


def _violations(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in FORBIDDEN_MODULES:
                    out.append(f"line {node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            if mod in FORBIDDEN_MODULES:
                out.append(f"line {node.lineno}: from {node.module} import ...")
            if mod == "random":
                for a in node.names:
                    if a.name not in ALLOWED_RANDOM_ATTRS:
                        out.append(f"line {node.lineno}: from random import {a.name}")
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "random" and node.attr not in ALLOWED_RANDOM_ATTRS:
                out.append(f"line {node.lineno}: random.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in {"open", "__import__", "eval", "exec"}:
            out.append(f"line {node.lineno}: {node.func.id}()")
    return out


def test_core_imports_no_clock_socket_file_or_thread():
    bad = {}
    for f in _core_files():
        v = _violations(ast.parse(f.read_text(), str(f)))
        if v:
            bad[f.name] = v
    assert not bad, f"impure code in raftsql/raft: {bad}"


def test_checker_catches_each_forbidden_pattern():
    # The checker itself must be able to fail.
    samples = {
        "import time": 1,
        "import os.path": 1,
        "from threading import Lock": 1,
        "import socket as s": 1,
        "import random\nx = random.random()": 1,
        "from random import randint": 1,
        "open('f')": 1,
        "import random\nr = random.Random(1)": 0,
    }
    for src, n in samples.items():
        assert len(_violations(ast.parse(src))) == n, src
