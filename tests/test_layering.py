"""The floors of sporevm (DESIGN.md §9): an import only ever points down.

Every module's imports are parsed with ``ast`` (module level, inside functions
and under ``TYPE_CHECKING`` alike: a lazy import is still a dependency) and
each edge between floors must be one the floor may take:

    cli            anything
    pipeline       build, dist, format, bottom                    (spore build's whole graph:
                                                                   the build's stages, then
                                                                   bundle and push over dist)
    store tools    build, format, bottom                          (prune and cache verify:
                                                                   what they read, no VM)
    build          runtime, format, bottom                        (never dist)
    dist           format, bottom                                 (never build, runtime, vmm)
    runtime        vmm, format, bottom                            (with egress/: the per-VM
                                                                   network gateway, a VM process
                                                                   jailed like the monitor)
    vmm            format, bottom                                 (the backend implements the
                                                                   format's contract, never above)
    format         bottom                                         (spore/: never vmm, runtime)
    bottom         bottom                                         (store, sporefile, errors,
                                                                   atomic, nofollow, strictjson,
                                                                   net/)

A module no floor claims fails too, so a new package must say where it sits.
Then, end to end: the commands that only read or move spores (inspect, verify,
pack, unpack, push, pull) run in a subprocess and must not have loaded a single
``sporevm.vmm`` or ``sporevm.runtime`` module.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_bundle import make_spores

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "sporevm"

# Longest prefix wins; a prefix names a module or a package (and everything in it).
FLOORS: dict[str, str] = {
    "sporevm.cli": "cli",
    "sporevm.pipeline": "pipeline",
    "sporevm.build": "build",
    "sporevm.dist": "dist",
    "sporevm.runtime": "runtime",
    "sporevm.egress": "runtime",
    "sporevm.vmm": "vmm",
    "sporevm.spore": "format",
    "sporevm.storegc": "store tools",
    "sporevm.storecheck": "store tools",
    **{
        f"sporevm.{m}": "bottom"
        for m in (
            "store",
            "storeroots",
            "sporefile",
            "sporefile_schema",
            "sporefile_yaml",
            "errors",
            "atomic",
            "nofollow",
            "strictjson",
            "pyspawn",
            "units",
            "net",
        )
    },
    "sporevm": "bottom",  # the package itself (__version__)
}
ALL = frozenset(set(FLOORS.values()))
MAY_IMPORT: dict[str, frozenset[str]] = {
    "cli": ALL,
    "pipeline": frozenset({"pipeline", "build", "dist", "format", "bottom"}),
    "store tools": frozenset({"store tools", "build", "format", "bottom"}),
    "build": frozenset({"build", "runtime", "format", "bottom"}),
    "dist": frozenset({"dist", "format", "bottom"}),
    "runtime": frozenset({"runtime", "vmm", "format", "bottom"}),
    "vmm": frozenset({"vmm", "format", "bottom"}),
    "format": frozenset({"format", "bottom"}),
    "bottom": frozenset({"bottom"}),
}
# Edges allowed against the floors above, each with the reason it is still here.
ALLOWED: dict[tuple[str, str], str] = {
    # Prune's plan reads spore and OCI manifests, so it sits above the store it serves and
    # the store imports it lazily, inside Store.collect.
    ("sporevm.store", "sporevm.storegc"): "prune's reachability plan, loaded by collect()",
}


def floor_of(module: str) -> str | None:
    best = max(
        (p for p in FLOORS if module == p or (p != PACKAGE and module.startswith(p + "."))),
        key=len,
        default=None,
    )
    return FLOORS[best] if best is not None else None


def _modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` under ``root``, by dotted name (packages by __init__)."""
    out: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str:
    """The longest known module ``name`` is or lies in (``pkg.mod.attr`` -> ``pkg.mod``)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts) if parts else name


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, resolved to known modules."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, _resolve(a.name, known)) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for a in node.names:  # `from pkg import mod` imports the module pkg.mod
                full = f"{target}.{a.name}"
                out.append((node.lineno, full if full in known else _resolve(target, known)))
    return out


def violations(
    root: Path, package: str = PACKAGE, allowed: dict[tuple[str, str], str] | None = None
) -> list[str]:
    """Every import between floors that the floors forbid, as one line each."""
    allowed = ALLOWED if allowed is None else allowed
    known = _modules(root, package)
    found: list[str] = []
    for module, path in known.items():
        mine = floor_of(module)
        where = f"{path.relative_to(root)}"
        if mine is None:
            found.append(f"{where}: {module} is on no floor (add it to FLOORS)")
            continue
        for line, target in imports(module, path, known):
            if not (target == package or target.startswith(package + ".")):
                continue  # the standard library and third parties
            theirs = floor_of(target)
            if theirs is None or theirs in MAY_IMPORT[mine]:
                continue  # a module on no floor is reported where it is defined
            if any(module == a and (target == b or target.startswith(b + ".")) for a, b in allowed):
                continue
            found.append(f"{where}:{line}: {module} ({mine}) imports {target} ({theirs})")
    return found


def test_the_tree_keeps_its_floors() -> None:
    assert violations(ROOT) == []


# --- the checker itself, on synthetic trees -----------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in {"sporevm/__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root).parents:
            init = root / parent / "__init__.py"
            if parent != Path(".") and not init.exists():
                init.write_text("")
        path.write_text(textwrap.dedent(text))
    return root


BASE = {
    "sporevm/errors.py": "",
    "sporevm/store.py": "from sporevm.errors import SporeError\n",
    "sporevm/spore/manifest.py": "from sporevm.store import Store\n",
    "sporevm/vmm/machine.py": "from sporevm.spore import manifest\n",
    "sporevm/runtime/monitor.py": "from sporevm.vmm.machine import Machine\n",
    "sporevm/dist/pack.py": "from sporevm.spore.manifest import decode\n",
    "sporevm/build/graph.py": "from sporevm.runtime import monitor\n",
    "sporevm/cli.py": "import sporevm.build.graph\nimport sporevm.dist.pack\n",
}


def test_a_clean_synthetic_tree_passes(tmp_path: Path) -> None:
    assert violations(_tree(tmp_path, BASE)) == []


@pytest.mark.parametrize(
    ("path", "line", "edge"),
    [
        ("sporevm/spore/manifest.py", "from sporevm.vmm.board import SLOT_BLK", "(format) imports"),
        ("sporevm/spore/fork.py", "from sporevm.runtime import monitor", "(format) imports"),
        ("sporevm/build/steps.py", "from sporevm.dist import pack", "(build) imports"),
        ("sporevm/dist/pull.py", "from sporevm.build import graph", "(dist) imports"),
        ("sporevm/build/graph.py", "from sporevm.pipeline import driver", "(build) imports"),
        ("sporevm/pipeline/driver.py", "from sporevm.runtime import monitor", "(pipeline) imports"),
        ("sporevm/dist/pull.py", "from sporevm.runtime.monitor import x", "(dist) imports"),
        ("sporevm/dist/pull.py", "import sporevm.vmm.machine", "(dist) imports"),
        ("sporevm/vmm/board.py", "from sporevm.runtime import monitor", "(vmm) imports"),
        ("sporevm/vmm/board.py", "from sporevm.build import graph", "(vmm) imports"),
        ("sporevm/store.py", "from sporevm.spore import manifest", "(bottom) imports"),
        ("sporevm/nofollow.py", "from sporevm.dist import pack", "(bottom) imports"),
        ("sporevm/net/http.py", "from sporevm.build import graph", "(bottom) imports"),
        # lazy, inside a function, and relative: still an edge
        ("sporevm/spore/chunks.py", "def f():\n    from ..vmm import memory\n", "(format) imports"),
        ("sporevm/spore/chunks.py", "from sporevm import vmm", "(format) imports"),
    ],
)
def test_a_planted_forbidden_import_fails(tmp_path: Path, path: str, line: str, edge: str) -> None:
    files = {
        **BASE,
        "sporevm/vmm/board.py": "",
        "sporevm/vmm/memory.py": "",
        "sporevm/dist/pack.py": "",
        "sporevm/pipeline/driver.py": "from sporevm.build import graph\n"
        "from sporevm.dist import pack\n",
    }
    files[path] = files.get(path, "") + line + "\n"
    found = violations(_tree(tmp_path, files))
    assert len(found) == 1 and path in found[0] and edge in found[0], found


def test_an_unclaimed_module_fails(tmp_path: Path) -> None:
    found = violations(_tree(tmp_path, {**BASE, "sporevm/newthing/x.py": ""}))
    assert found and all("on no floor" in f for f in found), found


def test_an_allowed_edge_is_named_exactly(tmp_path: Path) -> None:
    files = {
        **BASE,
        "sporevm/build/graph.py": "from sporevm.dist import pack\n",
        "sporevm/build/other.py": "from sporevm.dist import pack\n",
    }
    found = violations(
        _tree(tmp_path, files), allowed={("sporevm.build.graph", "sporevm.dist"): "test"}
    )
    assert len(found) == 1 and "sporevm.build.other" in found[0], found


# --- commands that only read or move spores load no hypervisor ----------------------------

PROBE = """
import json, sys
from sporevm.cli import main
code = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.startswith(("sporevm.vmm", "sporevm.runtime")))
sys.stderr.write("\\nLOADED " + json.dumps({"code": code, "loaded": loaded}) + "\\n")
"""


def _spore_cli(home: Path, *args: str) -> tuple[str, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=120,
        env={**os.environ, "SPORE_HOME": str(home)},
    )
    marker = proc.stderr.rpartition("\nLOADED ")[2]
    assert marker and proc.returncode == 0, (args, proc.stdout, proc.stderr)
    doc = json.loads(marker)
    assert doc["code"] == 0, (args, proc.stdout, proc.stderr)
    return proc.stdout, doc["loaded"]


def test_reading_and_moving_spores_loads_no_vmm(tmp_path: Path) -> None:
    s = make_spores(tmp_path / "src", n_children=1)
    home = s.store.root
    bundle, remote, clean = tmp_path / "b.bundle", tmp_path / "remote", tmp_path / "clean"
    steps: list[tuple[str, ...]] = [
        ("inspect", str(s.parent)),
        ("verify", str(s.parent)),
        ("pack", str(s.parent), "--children", str(s.children), "--out", str(bundle)),
        ("inspect", str(bundle)),
        ("unpack", str(bundle), "--out", str(tmp_path / "unpacked.spore")),
        ("push", str(bundle), f"file://{remote}"),
    ]
    pinned = ""
    for args in steps:
        out, loaded = _spore_cli(home, *args)
        assert loaded == [], (args, loaded)
        if args[0] == "push":
            pinned = out.strip().splitlines()[-1]
    assert pinned.startswith(f"file://{remote}@sha256:"), pinned
    out, loaded = _spore_cli(clean, "pull", pinned, "--out", str(tmp_path / "pulled.spore"))
    assert loaded == [], loaded
    assert (tmp_path / "pulled.spore" / "manifest.json").is_file()
