"""Only aiki/sources.py may read the wall clock, OS randomness or make random ids.

Everything else must take an injected ``aiki.sources.Sources`` so that a simulation runs a
whole cluster from one seed. This test scans the package source with ``ast`` and names every
forbidden call or reference by file:line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import aiki

PACKAGE = Path(aiki.__file__).resolve().parent
ALLOWED_FILE = PACKAGE / "sources.py"

# Fully qualified names that must not be referenced (called, passed around or imported).
FORBIDDEN: frozenset[str] = frozenset(
    {
        "time.time",
        "time.time_ns",
        "datetime.datetime.now",
        "datetime.datetime.utcnow",
        "datetime.datetime.today",
        "datetime.date.today",
        "uuid.uuid1",
        "uuid.uuid4",
        "os.urandom",
        "os.getrandom",
    }
)
# Every name in these modules is forbidden.
FORBIDDEN_MODULES: frozenset[str] = frozenset({"secrets"})
# In ``random`` only the seedable class may be used; its module-level functions share one
# hidden, OS-seeded generator.
RANDOM_ALLOWED: frozenset[str] = frozenset({"random.Random"})


def is_forbidden(qualname: str) -> bool:
    if qualname in FORBIDDEN:
        return True
    module, _, rest = qualname.partition(".")
    if module in FORBIDDEN_MODULES:
        return True
    if module == "random" and rest:
        return qualname not in RANDOM_ALLOWED
    return False


class _Scanner(ast.NodeVisitor):
    """Resolves names through the file's imports and records forbidden references."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}  # local name -> fully qualified name
        self.found: list[tuple[int, str]] = []

    def _report(self, node: ast.AST, qualname: str) -> None:
        self.found.append((getattr(node, "lineno", 0), qualname))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.asname is not None:
                self.aliases[alias.asname] = alias.name
            else:
                top = alias.name.partition(".")[0]
                self.aliases[top] = top
            if alias.name.partition(".")[0] in FORBIDDEN_MODULES:
                self._report(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or node.module is None:
            return  # relative imports stay inside aiki
        for alias in node.names:
            if alias.name == "*":
                qualname = f"{node.module}.*"
                if node.module in FORBIDDEN_MODULES or node.module in {
                    "time",
                    "uuid",
                    "os",
                    "random",
                    "datetime",
                }:
                    self._report(node, qualname)
                continue
            qualname = f"{node.module}.{alias.name}"
            self.aliases[alias.asname or alias.name] = qualname
            if is_forbidden(qualname):
                self._report(node, qualname)

    def _qualname(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self._qualname(node.value)
            return None if base is None else f"{base}.{node.attr}"
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        qualname = self._qualname(node)
        if qualname is not None and is_forbidden(qualname):
            self._report(node, qualname)
            return  # do not report the inner part of the same chain again
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        qualname = self.aliases.get(node.id)
        if qualname is not None and is_forbidden(qualname):
            self._report(node, qualname)


def scan_source(source: str, filename: str = "<string>") -> list[tuple[int, str]]:
    """(line, qualified name) of every forbidden reference in ``source``."""
    tree = ast.parse(source, filename=filename)
    scanner = _Scanner()
    # Imports first, wherever they are, so a name used above a local import still resolves.
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            scanner.visit(node)
    scanner.found.clear()
    scanner.visit(tree)
    return sorted(set(scanner.found))


def python_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.resolve() != ALLOWED_FILE)


def test_only_sources_reads_the_clock_and_randomness() -> None:
    files = python_files()
    assert len(files) > 5, f"expected the aiki package under {PACKAGE}"
    problems = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {qualname}"
        for path in files
        for line, qualname in scan_source(path.read_text(encoding="utf-8"), str(path))
    ]
    assert not problems, (
        "only aiki/sources.py may read the wall clock, OS randomness or make random ids; "
        "take an injected aiki.sources.Sources instead:\n  " + "\n  ".join(problems)
    )


# -- the scanner itself --------------------------------------------------------------------
def test_scanner_sees_what_sources_py_does() -> None:
    found = {name for _, name in scan_source(ALLOWED_FILE.read_text(encoding="utf-8"))}
    assert {"time.time", "uuid.uuid4"} <= found


def test_scanner_flags_forbidden_forms() -> None:
    source = """\
import time
import time as t
import datetime
import datetime as dt
import uuid, os
import random
import secrets
from time import time_ns
from datetime import datetime as DT, date
from uuid import uuid1 as make_id
from random import randint, Random
from os import urandom
import os.path

time.time()
t.time_ns
datetime.datetime.now()
dt.datetime.utcnow()
DT.now()
DT.today()
date.today()
uuid.uuid4()
make_id()
os.urandom(8)
random.random()
random.choice([1])
random.shuffle([])
random.seed(1)
random.uniform(0, 1)
f = random.randint
os.path.join("a")
"""
    found = scan_source(source)
    names = [name for _, name in found]
    lines = {name: line for line, name in found}
    for expected in [
        "secrets",
        "time.time_ns",
        "datetime.date.today",
        "uuid.uuid1",
        "random.randint",
        "os.urandom",
        "time.time",
        "datetime.datetime.now",
        "datetime.datetime.utcnow",
        "datetime.datetime.today",
        "uuid.uuid4",
        "random.random",
        "random.choice",
        "random.shuffle",
        "random.seed",
        "random.uniform",
    ]:
        assert expected in names, f"{expected} not flagged in {found}"
    assert lines["time.time"] == 15
    assert lines["random.uniform"] == 29
    assert (30, "random.randint") in found
    assert "random.Random" not in names
    assert not any(name.startswith("os.path") for name in names)


def test_scanner_allows_injected_sources_and_lookalikes() -> None:
    source = """\
import random
import datetime
from random import Random
from aiki.sources import Sources

class Run:
    async def uuid4(self) -> str:
        return self.sources.new_id()

    def random(self) -> float:
        return self.rng.random()

def f(rng: random.Random, sources: Sources) -> None:
    r = Random(1)
    rng.randint(1, 2)
    sources.clock.now()
    datetime.datetime.fromisoformat("2020-01-01")
    now = sources.clock.now
    time = 3
    time.time
    uuid = None
"""
    assert scan_source(source) == []
