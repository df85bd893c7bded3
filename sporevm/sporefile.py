"""Load, validate and model a Sporefile (the user-facing reference is docs/sporefile.md).

Pipeline: bounded read -> strict UTF-8 -> YAML composed to a node tree (no aliases,
anchors, merge keys, foreign tags, duplicate keys or extra documents) -> plain JSON
values plus a map from document path to source position -> JSON Schema 2020-12
(sporefile.schema.json) -> semantic checks that a schema cannot express -> frozen model.
Every rejection is one SporefileError line ``file:line:col: path: problem; expectation``.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, NoReturn

import blake3

from sporevm.errors import SporefileError
from sporevm.sporefile_schema import Verdicts, first_error
from sporevm.sporefile_schema import schema as schema  # re-exported
from sporevm.sporefile_yaml import Doc, DocPath, compose, kind
from sporevm.units import _DURATION_EXPECTED, GIB, MIB, show
from sporevm.units import (  # re-exported: the Sporefile's units are the CLI's
    format_duration as format_duration,
)
from sporevm.units import format_size as format_size
from sporevm.units import parse_duration as parse_duration
from sporevm.units import parse_size as parse_size

VERSION = 1
MAX_BYTES = 1 << 20  # a Sporefile is a page of YAML; anything bigger is a mistake or an attack
MIN_MEMORY = 64 * MIB
MAX_MEMORY = 64 * GIB
MEMORY_ALIGN = 2 * MIB  # guest memory is snapshotted in 2 MiB chunks
DEFAULT_MEMORY = 512 * MIB
MAX_DURATION_MS = 24 * 3600 * 1000
DEFAULT_READY_TIMEOUT = 30.0
DEFAULT_PLATFORM = "linux/amd64"

Command = str | tuple[str, ...]


# -- model -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Base:
    image: str
    platform: str


@dataclass(frozen=True, slots=True)
class Machine:
    memory: int  # bytes
    vcpus: int
    kernel: str  # "managed" or the path as written, relative to the Sporefile's directory
    kernel_path: Path | None = None  # resolved absolute path of a custom kernel


@dataclass(frozen=True, slots=True)
class FileSpec:
    src: Path  # absolute, symlinks resolved, inside the context
    src_rel: str  # normalised relative path as written
    dst: str
    mode: int | None


@dataclass(frozen=True, slots=True)
class ReadyProbe:
    kind: Literal["file", "tcp", "command"]
    file: str | None
    tcp: int | None
    command: Command | None
    timeout: float  # seconds


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """``cache:``: URIs as written (parsed by the pipeline when the build starts)."""

    sources: tuple[str, ...] = ()
    sinks: tuple[str, ...] = ()
    mode: str | None = None  # "min" | "max"; None: max


@dataclass(frozen=True, slots=True)
class Artifact:
    """A step's ``copy_out:`` entry: guest ``src`` into the context's ``out/<dst>``."""

    src: str  # absolute guest path
    dst: str  # normalised, relative to out/
    path: Path  # context/out/dst


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    run: Command  # str: shell command line; tuple: argv
    env: tuple[tuple[str, str], ...]  # effective: Sporefile env overlaid by the step's own env
    workdir: str  # effective: the step's workdir, else the Sporefile's
    timeout: float | None  # seconds
    background: bool
    ready: ReadyProbe | None
    copy_out: tuple[Artifact, ...] = ()  # collected by the build after the step (steps.py)


@dataclass(frozen=True, slots=True)
class Check:
    run: Command
    timeout: float | None


@dataclass(frozen=True, slots=True)
class Output:
    spore: Path
    bundle: Path


@dataclass(frozen=True, slots=True)
class Sporefile:
    version: int
    name: str
    base: Base
    machine: Machine
    env: tuple[tuple[str, str], ...]
    workdir: str
    files: tuple[FileSpec, ...]
    steps: tuple[Step, ...]
    snapshot_after: str | None
    verify: tuple[Check, ...]
    output: Output
    path: Path
    context: Path
    digest: str  # "blake3:<hex>" of the raw file bytes
    push: tuple[str, ...] = ()  # bundle URIs; parsed by sporevm.dist.uri when the build starts
    cache: CacheSettings = CacheSettings()  # remote build caches (pipeline/remote_cache.py)
    # network.allow as written (None: no network key, no NIC); checked and made canonical
    # by the egress policy when the build starts (sporevm.runtime.network).
    network: tuple[str, ...] | None = None


# -- canonical forms (inputs to cache keys) ----------------------------------------------------
def _canon(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1000)


def _command_obj(run: Command) -> dict[str, object]:
    # Tagged, so the shell line "a b" and the argv ["a b"] never collide.
    return {"shell": run} if isinstance(run, str) else {"argv": list(run)}


def canonical_step(step: Step) -> bytes:
    """Canonical JSON of everything that can change what a step does (env sorted)."""
    ready = step.ready
    return _canon(
        {
            "v": 1,
            "name": step.name,
            "run": _command_obj(step.run),
            "env": sorted([k, v] for k, v in step.env),
            "workdir": step.workdir,
            "timeout_ms": _ms(step.timeout),
            "background": step.background,
            "ready": None
            if ready is None
            else {
                "kind": ready.kind,
                "file": ready.file,
                "tcp": ready.tcp,
                "command": None if ready.command is None else _command_obj(ready.command),
                "timeout_ms": _ms(ready.timeout),
            },
            # Only when present: the keys of steps without artifacts stay what they were.
            **({"copy_out": [[a.src, a.dst] for a in step.copy_out]} if step.copy_out else {}),
        }
    )


def canonical_machine(m: Machine) -> bytes:
    """Canonical JSON of the machine shape (a custom kernel's bytes are keyed by digest)."""
    # Tagged, so a custom kernel file that happens to be named "managed" cannot collide.
    kernel: object = "managed" if m.kernel_path is None else {"file": m.kernel}
    return _canon({"v": 1, "memory": m.memory, "vcpus": m.vcpus, "kernel": kernel})


# -- semantic checks and the model -------------------------------------------------------------
class _Builder:
    def __init__(self, doc: Doc, context: Path) -> None:
        self.doc = doc
        self.context = context

    def fail(self, path: DocPath, msg: str, *, at_key: bool = False) -> NoReturn:
        raise self.doc.error(path, msg, at_key=at_key)

    def size(self, path: DocPath, value: str | int) -> int:
        try:
            return parse_size(value)
        except SporefileError as exc:
            self.fail(path, str(exc))

    def duration(self, path: DocPath, value: str | None) -> float | None:
        if value is None:
            return None
        try:
            seconds = parse_duration(value)
        except SporefileError as exc:
            self.fail(path, str(exc))
        if seconds * 1000 > MAX_DURATION_MS:
            self.fail(path, f"{show(value)} is longer than 24h; {_DURATION_EXPECTED}")
        return seconds

    def guest_path(self, path: DocPath, value: str) -> str:
        if ".." in PurePosixPath(value).parts:
            self.fail(path, f"{show(value)} contains '..'; write the absolute path without '..'")
        return value

    def context_path(self, path: DocPath, rel: str, *, must_exist: bool) -> tuple[Path, str]:
        """Resolve a context-relative path; it must stay inside, symlinks included."""
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts:
            self.fail(
                path,
                f"{show(rel)} leaves the build context; write a path relative to "
                f"{self.context} without '..'",
            )
        try:
            resolved = (self.context / pure).resolve(strict=must_exist)
        except FileNotFoundError:
            self.fail(
                path,
                f"{show(rel)} does not exist in the build context {self.context}; "
                "create it or fix the path",
            )
        except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop (Python 3.11)
            reason = getattr(exc, "strerror", None) or "symlink loop"
            self.fail(path, f"{show(rel)} cannot be resolved ({reason}); fix the path")
        if not resolved.is_relative_to(self.context):
            self.fail(
                path,
                f"{show(rel)} resolves to {show(str(resolved))}, outside the build "
                f"context {self.context}; only files inside the Sporefile's directory may "
                "be used",
            )
        return resolved, str(pure)

    def command(self, value: str | list[str]) -> Command:
        return value if isinstance(value, str) else tuple(value)

    def mode(self, path: DocPath, value: str | int | None) -> int | None:
        if value is None:
            return None
        if isinstance(value, str):
            return int(value.removeprefix("0o"), 8)
        raw = self.doc.raw(path)
        if not re.fullmatch(r"0[0-7_]*", raw):  # YAML reads 755 as decimal: almost surely a slip
            self.fail(
                path,
                f"{raw} is not written in octal; write the mode as a quoted octal "
                'string, e.g. "0755"',
            )
        return value

    def machine(self, data: dict[str, Any]) -> Machine:
        p: DocPath = ("machine",)
        memory = self.size((*p, "memory"), data.get("memory", DEFAULT_MEMORY))
        shown = format_size(memory)
        if not MIN_MEMORY <= memory <= MAX_MEMORY:
            self.fail(
                (*p, "memory"),
                f"{shown} is out of range; expected "
                f"{format_size(MIN_MEMORY)} to {format_size(MAX_MEMORY)}",
            )
        if memory % MEMORY_ALIGN:
            self.fail((*p, "memory"), f"{shown} is not a multiple of 2MiB; expected e.g. 512MiB")
        kernel: str = data.get("kernel", "managed")
        kernel_path = None
        if kernel != "managed":
            kernel_path, kernel = self.context_path((*p, "kernel"), kernel, must_exist=True)
            if not kernel_path.is_file():
                self.fail(
                    (*p, "kernel"),
                    f"{show(kernel)} is not a regular file; expected a bzImage, or managed",
                )
        return Machine(memory, data.get("vcpus", 1), kernel, kernel_path)

    def file(self, p: DocPath, data: dict[str, Any]) -> FileSpec:
        src, rel = self.context_path((*p, "src"), data["src"], must_exist=True)
        if not (src.is_file() or src.is_dir()):
            self.fail(
                (*p, "src"),
                f"{show(rel)} is neither a regular file nor a directory; "
                "only files and directories can be copied",
            )
        dst = self.guest_path((*p, "dst"), data["dst"])
        return FileSpec(src, rel, dst, self.mode((*p, "mode"), data.get("mode")))

    def step(self, p: DocPath, data: dict[str, Any], env: dict[str, str], workdir: str) -> Step:
        ready = None
        if "ready" in data:
            if not data.get("background", False):
                self.fail(
                    (*p, "ready"),
                    "ready is only allowed on a background step; add "
                    "background: true or remove ready",
                    at_key=True,
                )
            r: dict[str, Any] = data["ready"]
            rp: DocPath = (*p, "ready")
            kind: Literal["file", "tcp", "command"] = (
                "file" if "file" in r else "tcp" if "tcp" in r else "command"
            )
            ready = ReadyProbe(
                kind,
                self.guest_path((*rp, "file"), r["file"]) if "file" in r else None,
                r.get("tcp"),
                self.command(r["command"]) if "command" in r else None,
                self.duration((*rp, "timeout"), r.get("timeout")) or DEFAULT_READY_TIMEOUT,
            )
        merged = dict(env)
        merged.update(data.get("env", {}))
        wd = self.guest_path((*p, "workdir"), data["workdir"]) if "workdir" in data else workdir
        if data.get("background", False) and data.get("copy_out"):
            self.fail(
                (*p, "copy_out"),
                "copy_out is collected when a step exits, and a background step does not; "
                "move it to a later step",
                at_key=True,
            )
        return Step(
            data["name"],
            self.command(data["run"]),
            tuple(merged.items()),
            wd,
            self.duration((*p, "timeout"), data.get("timeout")),
            data.get("background", False),
            ready,
            tuple(
                self.artifact((*p, "copy_out", i), a)
                for i, a in enumerate(data.get("copy_out", []))
            ),
        )

    def artifact(self, p: DocPath, data: dict[str, Any]) -> Artifact:
        dst = posixpath.normpath(data["dst"])
        src = posixpath.normpath(self.guest_path((*p, "src"), data["src"]))
        return Artifact("/" + src.lstrip("/"), dst, self.context / "out" / dst)

    def output(self, data: dict[str, Any], name: str, sporefile: Path) -> Output:
        paths: list[Path] = [self.context, sporefile]  # never the directory or the Sporefile
        for key in ("spore", "bundle"):
            rel = data.get(key, f"out/{name}.{key}")
            resolved, _ = self.context_path(("output", key), rel, must_exist=False)
            # Spores and bundles are directories: an existing one is replaced by the next
            # build, but only if it is one of ours (it holds a manifest or bundle.json).
            ours = (resolved / ("manifest.json" if key == "spore" else "bundle.json")).is_file()
            if resolved in paths or (resolved.is_dir() and not ours):
                self.fail(
                    ("output", key),
                    f"{show(rel)} cannot be used as an output path; "
                    "expected a distinct file path such as out/NAME.spore",
                )
            paths.append(resolved)
        return Output(paths[2], paths[3])

    def check_artifacts(self, steps: list[Step], output: Output) -> None:
        """Artifact directories are distinct and apart from the spore and bundle outputs
        (a step must not replace what the build writes, or another step's artifacts)."""
        taken: list[tuple[Path, DocPath]] = [
            (output.spore, ("output",)),
            (output.bundle, ("output",)),
        ]
        for i, step in enumerate(steps):
            for j, a in enumerate(step.copy_out):
                here: DocPath = ("steps", i, "copy_out", j, "dst")
                for other, _ in taken:
                    if a.path == other or a.path in other.parents or other in a.path.parents:
                        self.fail(
                            here,
                            f"out/{a.dst} overlaps {other}; give each artifact its own "
                            "directory below out/, apart from output.spore and output.bundle",
                        )
                taken.append((a.path, here))

    def build(self, data: dict[str, Any], path: Path, digest: str) -> Sporefile:
        env: dict[str, str] = data.get("env", {})
        workdir = self.guest_path(("workdir",), data.get("workdir", "/"))
        files = tuple(self.file(("files", i), f) for i, f in enumerate(data.get("files", [])))
        steps: list[Step] = []
        seen: dict[str, int] = {}
        for i, s in enumerate(data.get("steps", [])):
            if s["name"] in seen:
                first, _ = self.doc.mark(("steps", seen[s["name"]], "name"))
                self.fail(
                    ("steps", i, "name"),
                    f"duplicate step name {show(s['name'])} (first "
                    f"at line {first}); step names must be unique",
                )
            seen[s["name"]] = i
            steps.append(self.step(("steps", i), s, env, workdir))
        after = data.get("snapshot", {}).get("after")
        if after is not None and after not in seen:
            expected = (
                f"expected one of: {', '.join(seen)}"
                if seen
                else "the Sporefile has no steps, so remove snapshot.after"
            )
            self.fail(("snapshot", "after"), f"no step is named {show(after)}; {expected}")
        if after is None and steps:
            after = steps[-1].name
        verify = tuple(
            Check(self.command(c["run"]), self.duration(("verify", i, "timeout"), c.get("timeout")))
            for i, c in enumerate(data.get("verify", []))
        )
        output = self.output(data.get("output", {}), data["name"], path.resolve())
        self.check_artifacts(steps, output)
        base = data["base"]
        return Sporefile(
            version=VERSION,
            name=data["name"],
            base=Base(base["image"], base.get("platform", DEFAULT_PLATFORM)),
            machine=self.machine(data.get("machine", {})),
            env=tuple(env.items()),
            workdir=workdir,
            files=files,
            steps=tuple(steps),
            snapshot_after=after,
            verify=verify,
            output=output,
            path=path,
            context=self.context,
            digest=digest,
            push=tuple(data.get("push", [])),
            cache=CacheSettings(
                tuple(data.get("cache", {}).get("from", [])),
                tuple(data.get("cache", {}).get("to", [])),
                data.get("cache", {}).get("mode"),
            ),
            network=tuple(data["network"]["allow"]) if "network" in data else None,
        )


# -- entry points ------------------------------------------------------------------------------
def loads(text: bytes | str, path: Path, *, verdicts: Verdicts | None = None) -> Sporefile:
    """Parse and validate Sporefile content; ``path`` names it in errors and fixes the context."""
    name = str(path)
    if isinstance(text, str):
        try:
            text = text.encode("utf-8")
        except UnicodeEncodeError:
            raise SporefileError(
                f"{name}: the text cannot be encoded as UTF-8; save the file as UTF-8"
            ) from None
    if len(text) > MAX_BYTES:
        raise SporefileError(
            f"{name}: the file is {len(text)} bytes, over the limit of "
            f"{MAX_BYTES} (1 MiB); a Sporefile should be a page of YAML"
        )
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = text.count(b"\n", 0, exc.start) + 1
        col = exc.start - (text.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SporefileError(
            f"{name}:{line}:{col}: byte 0x{text[exc.start]:02x} is not valid "
            "UTF-8; save the file as UTF-8"
        ) from None
    doc = Doc(name, compose(name, decoded))
    data = doc.value
    if not isinstance(data, dict):
        raise doc.error(
            (),
            f"the document is {kind(data)}, not a mapping; "
            "expected a mapping starting with sporefile: 1",
        )
    if "sporefile" not in data:
        raise doc.error(
            ("sporefile",), 'missing required key "sporefile"; add sporefile: 1 as the first line'
        )
    version = data["sporefile"]
    if type(version) is not int or version != VERSION:  # checked first: fail closed on v2+
        raise doc.error(
            ("sporefile",),
            f"unsupported Sporefile version "
            f"{doc.raw(('sporefile',))}; this spore understands {VERSION}",
        )
    err = first_error(doc, verdicts)
    if err is not None:
        raise err
    abs_path = Path(os.path.abspath(path))
    try:
        context = abs_path.parent.resolve(strict=True)
    except (OSError, RuntimeError):
        raise SporefileError(
            f"{name}: the Sporefile's directory {abs_path.parent} cannot be "
            "resolved; run spore from an existing directory"
        ) from None
    digest = "blake3:" + blake3.blake3(text).hexdigest()
    return _Builder(doc, context).build(data, abs_path, digest)


def load(path: Path, verdicts: Verdicts | None = None) -> Sporefile:
    """Read (at most 1 MiB of) a Sporefile from disk and validate it."""
    try:
        # stat first: opening a FIFO or device named by mistake would block or never end
        if not stat.S_ISREG(path.stat().st_mode):
            raise SporefileError(f"{path}: not a regular file; pass the Sporefile's path with -f")
        with open(path, "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise SporefileError(
            f"{path}: cannot read the Sporefile ({exc.strerror}); check the path given with -f"
        ) from None
    return loads(data, path, verdicts=verdicts)
