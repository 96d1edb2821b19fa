"""The package's shape as a contract: no import cycles, and `harvester run` loads no simulator."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "harvester"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every harvester module ``path`` imports, at the top or inside a function."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("harvester"):
                found.add(target)
                # "from .sim import server" imports the module harvester.sim.server too.
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("harvester"))
    return found


def test_no_import_cycle_inside_the_package() -> None:
    """Function-level imports included: every module can be read without its importers."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {
        name: {m for m in imports_of(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    # A package imports its own modules through __init__ re-exports; that is not a cycle.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_harvester_run_loads_no_simulator_code() -> None:
    """The command line for `run`, the runner and everything they import: no harvester.sim,
    no bench (nor hdrh), no aiohttp at all (the default transport is http1.py), no pandas."""
    probe = (
        "import sys\n"
        "from harvester.cli import build_parser\n"
        "import harvester.runner, harvester.workers\n"
        "build_parser('run').parse_args(['run', '--ids', 'i', '--out', 'o'])\n"
        "banned = ('harvester.sim', 'harvester.bench', 'hdrh', 'aiohttp', 'harvester.session',"
        " 'pandas')\n"
        "print([m for m in sys.modules if m.startswith(banned)])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def test_the_simulator_commands_still_get_their_options() -> None:
    """`serve` and `demo` build their options (from the simulator) when asked for."""
    from harvester.cli import build_parser

    args = build_parser("serve").parse_args(["serve", "--profile", "chaos", "--saturated", "6"])
    assert (args.profile, args.saturated) == ("chaos", 6.0)
