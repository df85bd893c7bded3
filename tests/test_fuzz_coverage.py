"""Every parser of outside input has a fuzz target that CI runs (SECURITY.md, issue 6).

Reads SECURITY.md's attack-surface table. For every row: the fuzz target(s)
named in its last column exist, reach every module the first column names
(static import graph), have a non-empty seed corpus, and match the glob
``scripts/fuzz`` iterates over (which ``.ci/run`` runs through
``scripts/test``). Then the other direction: every module listed in PARSERS
below is covered by some row, and every module under sporevm/ that uses a
decoding primitive is either covered by a row, a shared decoder some target
reaches, or listed in NOT_PARSERS with the reason. A new parser without a row
and a target therefore fails here.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECURITY = ROOT / "SECURITY.md"
FUZZ_GLOB = "fuzz/fuzz_*.py"

# Every module that decodes bytes spore did not produce itself (guest memory and
# MMIO, registries, layouts, layers, Sporefiles, spores and bundles from peers).
PARSERS = {
    "sporevm/sporefile.py",
    "sporevm/sporefile_yaml.py",
    "sporevm/sporefile_schema.py",
    "sporevm/build/lockfile.py",
    "sporevm/build/ociref.py",
    "sporevm/build/ocimanifest.py",
    "sporevm/build/oci.py",
    "sporevm/net/auth.py",
    "sporevm/net/registry.py",
    "sporevm/build/layers.py",
    "sporevm/build/tarsafety.py",
    "sporevm/spore/manifest.py",
    "sporevm/spore/chunks.py",
    "sporevm/spore/blocktable.py",
    "sporevm/spore/vmstate.py",
    "sporevm/runtime/protocol.py",
    "sporevm/runtime/monitor_config.py",
    "sporevm/runtime/agent.py",
    "sporevm/runtime/agent_messages.py",
    "sporevm/runtime/agent_session.py",
    "sporevm/vmm/boot.py",
    "sporevm/vmm/machine.py",
    "sporevm/vmm/devices/serial.py",
    "sporevm/vmm/devices/power.py",
    *(
        f"sporevm/vmm/devices/virtio/{m}.py"
        for m in ("queue", "mmio", "device", "blk", "console", "rng", "net", "state")
    ),
    "sporevm/dist/bundle.py",
    "sporevm/dist/chunkpack.py",
    "sporevm/dist/rootfs_artifact.py",
    "sporevm/dist/docjson.py",
    "sporevm/dist/uri.py",
    "sporevm/dist/transport_oci.py",
    "sporevm/storeroots.py",
    "sporevm/pipeline/cache_entry.py",
    "sporevm/build/copy_extract.py",
    "sporevm/runtime/copyio.py",
}
# Decoding toolkits the parsers above are built on: not a surface of their own,
# but some fuzz target must reach them.
SHARED_DECODERS = {
    "sporevm/strictjson.py": "strict JSON for every JSON row",
    "sporevm/vmm/memory.py": "bounds-checked guest RAM reads under every virtio row",
}
# Modules that use a decoding primitive on bytes spore wrote itself or the kernel gave it.
NOT_PARSERS = {
    "sporevm/build/fileslayer.py": "writes a tar of the user's files; never reads one",
    "sporevm/build/copy_archive.py": "writes the tar of a --copy-in source; never reads one",
    "sporevm/store.py": "its own build-key records; a corrupt one is a cache miss",
    "sporevm/storecheck.py": "re-hashes and re-reads its own store records",
    "sporevm/storegc.py": "its own build-key records (as store.py); one that does not parse "
    "reaches nothing, and live spores are judged from their manifests "
    "(manifest.py) and root records (storeroots.py) only",
    "sporevm/runtime/lazy.py": "userfaultfd messages from the kernel",
    "sporevm/vmm/cpu.py": "KVM structs; the guest page walk (diagnostics) is <= 5 PTE reads "
    "through GuestMemory's bounds checks",
    "sporevm/dist/transport_s3.py": "only encodes (endpoint split, checksum header); answers go "
    "through boto3 and the bundle decoders",
}
# Decoding primitives: a module using one of these on outside bytes is a parser.
DECODING = re.compile(
    r"strictjson|json\.loads?\(|struct\.unpack|unpack_from|iter_unpack|\.from_bytes\(|yaml"
    r"|tarfile|urlsplit|urlparse|b64decode|fromhex\("
)


@dataclass
class Row:
    line: int
    surface: str
    modules: list[str] = field(default_factory=list)  # repo-relative paths
    targets: list[str] = field(default_factory=list)  # repo-relative paths


def _expand(token: str) -> list[str]:
    """`transport_{file,http}.py` -> both names."""
    m = re.search(r"\{([^}]*)\}", token)
    if not m:
        return [token]
    return [token[: m.start()] + alt + token[m.end() :] for alt in m.group(1).split(",")]


def parse_rows(text: str) -> list[Row]:
    """Rows of the table under '## Attack surface', modules and targets resolved to paths."""
    rows: list[Row] = []
    in_table = False
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("## "):
            in_table = line.strip() == "## Attack surface"
            continue
        if not in_table or not line.startswith("|") or re.match(r"\|\s*(Surface|-)", line):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        row = Row(n, cells[0])
        last_dir = ""
        for token in re.findall(r"`([^`]+)`", cells[0]):
            for name in _expand(token):
                if name.startswith("sporevm/"):
                    last_dir = name if name.endswith("/") else name.rpartition("/")[0] + "/"
                    row.modules.append(name)
                elif re.fullmatch(r"[\w]+\.py", name) and last_dir:
                    row.modules.append(last_dir + name)  # relative to the last full path
        row.targets = re.findall(r"fuzz/fuzz_\w+\.py", cells[-1])
        rows.append(row)
    return rows


def module_files(path: str) -> list[str]:
    """A named module, or every module of a named package directory."""
    if path.endswith("/"):
        return sorted(
            str(p.relative_to(ROOT)) for p in (ROOT / path).glob("*.py") if p.name != "__init__.py"
        )
    return [path]


def _dotted_to_path(name: str) -> str | None:
    base = ROOT / name.replace(".", "/")
    if base.with_suffix(".py").is_file():
        return str(base.with_suffix(".py").relative_to(ROOT))
    if (base / "__init__.py").is_file():
        return str((base / "__init__.py").relative_to(ROOT))
    return None


@cache
def direct_imports(path: str) -> frozenset[str]:
    """sporevm modules (repo-relative paths) that ``path`` imports explicitly."""
    tree = ast.parse((ROOT / path).read_text(), path)
    package = path.rpartition("/")[0].replace("/", ".")
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                mod = ".".join(p for p in [*parts, mod] if p)
            names = [mod, *(f"{mod}.{a.name}" for a in node.names)]
        for name in names:
            if name.startswith("sporevm") and (p := _dotted_to_path(name)):
                out.add(p)
    return frozenset(out)


@cache
def closure(path: str) -> frozenset[str]:
    seen: set[str] = set()
    todo = [path]
    while todo:
        for dep in direct_imports(todo.pop()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return frozenset(seen)


def corpus_dir(target: str) -> Path:
    return ROOT / "fuzz" / "corpus" / Path(target).stem.removeprefix("fuzz_")


def row_problems(row: Row) -> list[str]:
    """Everything wrong with one row; empty when it is fully covered."""
    where = f"SECURITY.md:{row.line} ({row.surface[:60]})"
    if not row.targets:
        return [f"{where}: names no fuzz target (fuzz/fuzz_*.py) in its last column"]
    problems = []
    reach: set[str] = set()
    direct: set[str] = set()
    for t in row.targets:
        if not (ROOT / t).is_file():
            problems.append(f"{where}: {t} does not exist")
            continue
        if not fnmatch.fnmatch(t, FUZZ_GLOB):
            problems.append(f"{where}: scripts/fuzz would not run {t}")
        if "def TestOneInput" not in (ROOT / t).read_text():
            problems.append(f"{where}: {t} defines no TestOneInput")
        corpus = corpus_dir(t)
        if not corpus.is_dir() or not any(p.is_file() for p in corpus.iterdir()):
            problems.append(f"{where}: {t} has no seed corpus in {corpus.relative_to(ROOT)}")
        reach |= closure(t)
        direct |= direct_imports(t)
    modules = [m for path in row.modules for m in module_files(path)]
    for m in modules:
        if not (ROOT / m).is_file():
            problems.append(f"{where}: names {m}, which does not exist")
        elif m not in reach:
            problems.append(f"{where}: no target of the row imports {m}")
    if modules and not direct & set(modules) and not problems:
        problems.append(f"{where}: no target imports any named module directly")
    return problems


def covered_modules(rows: list[Row]) -> set[str]:
    return {m for row in rows if row.targets for p in row.modules for m in module_files(p)}


# --- the repository ---------------------------------------------------------------------


def test_fuzz_script_globs_targets_and_ci_runs_it() -> None:
    script = (ROOT / "scripts" / "fuzz").read_text()
    assert f"for target in {FUZZ_GLOB}" in script
    assert "scripts/fuzz" in (ROOT / "scripts" / "test").read_text()
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()


ROWS = parse_rows(SECURITY.read_text())


def test_security_table_parsed() -> None:
    assert len(ROWS) >= 14, "the attack-surface table was not found or lost rows"
    assert covered_modules(ROWS) >= {"sporevm/sporefile.py", "sporevm/vmm/devices/virtio/queue.py"}


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"line{r.line}")
def test_every_security_row_has_a_runnable_fuzz_target(row: Row) -> None:
    assert row_problems(row) == []


def test_every_parser_module_has_a_row_with_a_target() -> None:
    missing = sorted(PARSERS - covered_modules(ROWS))
    assert missing == [], f"parser modules without a SECURITY.md row and fuzz target: {missing}"


def test_shared_decoders_are_reached_by_some_target() -> None:
    reach = set().union(*(closure(str(t.relative_to(ROOT))) for t in ROOT.glob(FUZZ_GLOB)))
    assert sorted(set(SHARED_DECODERS) - reach) == []


def test_every_decoding_module_is_classified() -> None:
    """A module that starts decoding things needs a row (and target) or a reason here."""
    covered = covered_modules(ROWS) | PARSERS | set(SHARED_DECODERS) | set(NOT_PARSERS)
    unclassified = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "sporevm").rglob("*.py")
        if DECODING.search(p.read_text()) and str(p.relative_to(ROOT)) not in covered
    )
    assert unclassified == [], (
        f"modules that decode input but are in no SECURITY.md row: {unclassified}; add a row "
        "and a fuzz target, or a reason to NOT_PARSERS in tests/test_fuzz_coverage.py"
    )
    for path in NOT_PARSERS:
        assert (ROOT / path).is_file(), f"NOT_PARSERS names {path}, which is gone"


def test_every_fuzz_target_is_named_by_a_row() -> None:
    named = {t for row in ROWS for t in row.targets}
    orphans = sorted(str(t.relative_to(ROOT)) for t in ROOT.glob(FUZZ_GLOB))
    assert [t for t in orphans if t not in named] == []


# --- the checker itself can fail ---------------------------------------------------------

_TABLE = """\
## Attack surface

| Surface | Input source | Checks | Fuzz target |
|---|---|---|---|
{rows}

## Reporting
"""


def _rows(*rows: str) -> list[Row]:
    return parse_rows(_TABLE.format(rows="\n".join(rows)))


def test_checker_flags_a_row_without_a_target() -> None:
    (row,) = _rows("| Things (`sporevm/build/ociref.py`) | x | y | covered elsewhere |")
    assert row.modules == ["sporevm/build/ociref.py"]
    assert any("names no fuzz target" in p for p in row_problems(row))
    assert "sporevm/build/ociref.py" not in covered_modules([row])


def test_checker_flags_missing_target_and_unreached_module() -> None:
    (row,) = _rows(
        "| T (`sporevm/build/ociref.py`, `lockfile.py`) | x | y | "
        "`fuzz/fuzz_ociref.py`, `fuzz/fuzz_nothing.py` |"
    )
    assert row.modules == ["sporevm/build/ociref.py", "sporevm/build/lockfile.py"]
    problems = row_problems(row)
    assert any("fuzz_nothing.py does not exist" in p for p in problems)
    assert any("imports sporevm/build/lockfile.py" in p for p in problems)


def test_checker_accepts_a_good_row_and_expands_braces() -> None:
    (row,) = _rows("| OCI (`sporevm/build/ocimanifest.py`) | x | y | `fuzz/fuzz_oci.py` |")
    assert row_problems(row) == []
    (row,) = _rows("| T (`sporevm/dist/transport_{file,oci}.py`) | x | y | `fuzz/fuzz_x.py` |")
    assert row.modules == ["sporevm/dist/transport_file.py", "sporevm/dist/transport_oci.py"]
