"""Sporefile loader: model, defaults, canonical forms and every kind of rejection."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import blake3
import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sporevm import sporefile, sporefile_schema, sporefile_yaml
from sporevm.errors import SporefileError
from sporevm.sporefile import (
    canonical_machine,
    canonical_step,
    format_duration,
    format_size,
    load,
    loads,
    parse_duration,
    parse_size,
)

HEAD = "sporefile: 1\nname: app\nbase: {image: debian:bookworm}\n"  # lines 1-3
BG = HEAD + "steps:\n  - name: a\n    run: x\n    background: true\n"  # lines 1-7

# Every Sporefile in sporefiles/valid/ must load (test_valid_fixtures_load) and pass the
# JSON Schema alone (scripts/test runs check-jsonschema on them against the root schema).
VALID = Path(__file__).resolve().parent / "sporefiles" / "valid"
FULL = (VALID / "full.yaml").read_text()


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "serve").write_text("#!/bin/sh\n")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "bzImage").write_bytes(b"\x00kernel")
    return tmp_path


def write(ctx: Path, text: str | bytes) -> Path:
    path = ctx / "Sporefile"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def error(ctx: Path, text: str | bytes) -> str:
    path = write(ctx, text)
    with pytest.raises(SporefileError) as info:
        load(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(str(path)), msg
    return msg


# -- happy paths -----------------------------------------------------------------------------
def test_full_sporefile_model(ctx: Path) -> None:
    path = write(ctx, FULL)
    sf = load(path)
    assert sf.version == 1 and sf.name == "py-warm"
    assert sf.base == sporefile.Base("127.0.0.1:5000/library/debian:bookworm", "linux/arm64/v8")
    assert sf.machine.memory == 1 << 30 and sf.machine.vcpus == 2
    assert sf.machine.kernel == "kernels/bzImage"
    assert sf.machine.kernel_path == (ctx / "kernels" / "bzImage").resolve()
    assert sf.env == (("LANG", "C.UTF-8"), ("DEBUG", "1"))
    assert sf.workdir == "/srv"
    assert [(f.src_rel, f.dst, f.mode) for f in sf.files] == [
        ("app", "/app", None),
        ("app/serve", "/usr/local/bin/serve", 0o755),
        ("app/serve", "/bin/b", 0o750),
        ("app/serve", "/bin/c", 0o644),
    ]
    assert sf.files[0].src == (ctx / "app").resolve()
    deps, build, server, watcher, poller = sf.steps
    assert deps.run == "python3 -c 'import json'" and deps.timeout == 120.0
    assert deps.workdir == "/srv" and deps.env == sf.env and not deps.background
    assert deps.ready is None
    assert build.run == ("make", "-C", "/src", "all") and build.workdir == "/src"
    # the step's env overlays the Sporefile's, keeping document order
    assert build.env == (("LANG", "C.UTF-8"), ("DEBUG", "0"), ("CC", "gcc"))
    assert build.timeout is None
    assert server.background and server.ready == sporefile.ReadyProbe("tcp", None, 8080, None, 90.0)
    assert watcher.ready == sporefile.ReadyProbe("file", "/run/ready", None, None, 30.0)
    assert poller.ready == sporefile.ReadyProbe(
        "command", None, None, ("test", "-S", "/run/app.sock"), 1.5
    )
    assert sf.snapshot_after == "server"
    assert sf.verify == (
        sporefile.Check("test -S /run/app.sock", 10.0),
        sporefile.Check(("/bin/true",), None),
    )
    assert sf.output == sporefile.Output(
        ctx.resolve() / "build/py.spore", ctx.resolve() / "build/py.bundle"
    )
    assert sf.path == path and sf.context == ctx.resolve()
    assert sf.digest == "blake3:" + blake3.blake3(FULL.encode()).hexdigest()
    assert loads(FULL, path) == sf == loads(FULL.encode(), path)


def test_defaults(ctx: Path) -> None:
    sf = load(write(ctx, HEAD))
    assert sf.base.platform == "linux/amd64"
    assert sf.machine == sporefile.Machine(512 << 20, 1, "managed", None)
    assert (sf.env, sf.workdir, sf.files, sf.steps, sf.verify) == ((), "/", (), (), ())
    assert sf.snapshot_after is None
    assert sf.output.spore == ctx.resolve() / "out" / "app.spore"
    assert sf.output.bundle == ctx.resolve() / "out" / "app.bundle"


def test_snapshot_defaults_to_last_step(ctx: Path) -> None:
    sf = load(write(ctx, HEAD + "steps:\n  - {name: a, run: x}\n  - {name: b, run: y}\n"))
    assert sf.snapshot_after == "b"


def test_memory_as_plain_bytes_and_yaml_oddities_stay_text(ctx: Path) -> None:
    text = HEAD + "machine: {memory: 536870912}\nenv: {DATE: 2024-01-01, EQ: =}\n"
    sf = load(write(ctx, text))
    assert sf.machine.memory == 512 << 20
    assert sf.env == (("DATE", "2024-01-01"), ("EQ", "="))


def test_explicit_core_tags_are_allowed(ctx: Path) -> None:
    sf = load(write(ctx, HEAD + "env: {N: !!str 1}\n"))
    assert sf.env == (("N", "1"),)


# -- canonical forms -------------------------------------------------------------------------
def test_canonical_step_covers_what_a_step_does(ctx: Path) -> None:
    sf = load(write(ctx, FULL))
    build = sf.steps[1]
    c = canonical_step(build)
    assert c == canonical_step(build) and b" " not in c  # no separators
    assert c.startswith(b'{"background":false,"env":[["CC","gcc"]')  # sorted keys and env
    variants = [
        replace(build, run="make -C /src all"),
        replace(build, run=("make -C /src all",)),
        replace(build, env=build.env[:-1]),
        replace(build, workdir="/"),
        replace(build, timeout=5.0),
        replace(build, background=True),
        replace(build, name="other"),
        replace(build, ready=sf.steps[2].ready),
    ]
    keys = {canonical_step(v) for v in variants} | {c}
    assert len(keys) == len(variants) + 1
    reordered = replace(build, env=tuple(reversed(build.env)))
    assert canonical_step(reordered) == c  # the environment is a set, not a list
    probe = sporefile.ReadyProbe("tcp", None, 8080, None, 31.0)
    moved = replace(sf.steps[2], ready=probe)
    assert canonical_step(moved) != canonical_step(sf.steps[2])


def test_canonical_machine() -> None:
    a = sporefile.Machine(512 << 20, 1, "managed")
    assert canonical_machine(a) == b'{"kernel":"managed","memory":536870912,"v":1,"vcpus":1}'
    assert canonical_machine(sporefile.Machine(512 << 20, 2, "managed")) != canonical_machine(a)
    assert canonical_machine(sporefile.Machine(1 << 30, 1, "managed")) != canonical_machine(a)
    # a kernel file that happens to be called "managed" is not the managed kernel
    named = sporefile.Machine(512 << 20, 1, "managed", Path("/ctx/managed"))
    assert canonical_machine(named) != canonical_machine(a)


def test_kernel_file_named_managed(ctx: Path) -> None:
    (ctx / "managed").write_bytes(b"k")
    sf = load(write(ctx, HEAD + "machine: {kernel: ./managed}\n"))
    assert sf.machine.kernel_path == (ctx / "managed").resolve()
    assert load(write(ctx, HEAD + "machine: {kernel: managed}\n")).machine.kernel_path is None


# -- sizes and durations ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", 1),
        ("512MiB", 512 << 20),
        ("4KiB", 4096),
        ("2GiB", 2 << 30),
        ("10B", 10),
        (7, 7),
    ],
)
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "512mb",
        "512MB",
        "1.5GiB",
        "-1",
        "0",
        "0MiB",
        "",
        " 1MiB",
        "1 MiB",
        "1TiB",
        "01MiB",
        "1MiB\n",
        0,
        -4,
    ],
)
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(SporefileError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("30s", 30.0),
        ("2m", 120.0),
        ("1m30s", 90.0),
        ("1500ms", 1.5),
        ("1h", 3600.0),
        ("1h2m3s4ms", 3723.004),
        ("24h", 86400.0),
        ("168h", 604800.0),
    ],
)
def test_parse_duration(text: str, value: float) -> None:
    assert parse_duration(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "30",
        "1.5s",
        "0s",
        "0ms",
        "-1s",
        "s",
        "",
        "1h0",
        "1d",
        "30 seconds",
        "2m1h",
        "1s1s",
        "30S",
        "30s\n",
        " 30s",
    ],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(SporefileError):
        parse_duration(text)


@given(st.integers(min_value=1, max_value=1 << 40))
def test_size_round_trip(n: int) -> None:
    text = format_size(n)
    assert parse_size(text) == n
    assert format_size(parse_size(text)) == text


@given(st.integers(0, 999), st.integers(0, 59), st.integers(0, 59), st.integers(0, 999))
def test_duration_round_trip(h: int, m: int, s: int, ms: int) -> None:
    total = ((h * 60 + m) * 60 + s) * 1000 + ms
    if total == 0:
        return
    text = "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s"), (ms, "ms")) if v)
    assert parse_duration(text) == total / 1000
    assert parse_duration(format_duration(parse_duration(text))) == total / 1000
    assert format_duration(total / 1000) == text


@given(st.text(max_size=30))
def test_parse_size_and_duration_fail_only_cleanly(text: str) -> None:
    for parse in (parse_size, parse_duration):
        try:
            value = parse(text)
        except SporefileError as exc:
            assert "\n" not in str(exc)
        else:
            assert value > 0 and text.isascii()


# -- rejections: each names file:line:col and the path -----------------------------------------
BAD = [
    # unknown keys at every level, reported at the key
    (HEAD + "foo: 1\n", '4:1: foo: unknown key "foo"; allowed keys are: base, cache, env, files'),
    (
        "sporefile: 1\nname: a\nbase: {image: d, arch: x}\n",
        '3:18: base.arch: unknown key "arch"; allowed keys are: image, platform',
    ),
    (HEAD + "machine:\n  cpus: 2\n", '5:3: machine.cpus: unknown key "cpus"'),
    (HEAD + "files:\n  - {src: app, dst: /a, owner: root}\n", "5:25: files[0].owner: unknown"),
    (HEAD + "steps:\n  - {name: a, run: x, user: root}\n", "5:23: steps[0].user: unknown key"),
    (
        HEAD
        + "steps:\n  - name: a\n    run: x\n    background: true\n    ready: {tcp: 1, udp: 2}\n",
        '8:21: steps[0].ready.udp: unknown key "udp"',
    ),
    (HEAD + "snapshot: {before: a}\n", '4:12: snapshot.before: unknown key "before"'),
    (HEAD + "verify:\n  - {run: x, retries: 3}\n", "5:14: verify[0].retries: unknown key"),
    (
        HEAD + "output: {dir: out}\n",
        '4:10: output.dir: unknown key "dir"; allowed keys are: bundle, spore',
    ),
    # versions
    (
        "sporefile: 2\nname: a\n",
        "1:12: sporefile: unsupported Sporefile version 2; this spore understands 1",
    ),
    ("sporefile: '1'\n", 'unsupported Sporefile version "1"'),
    ("sporefile: 1.0\n", "unsupported Sporefile version 1.0"),
    ("sporefile: true\n", "unsupported Sporefile version true"),
    ("name: a\n", '1:1: sporefile: missing required key "sporefile"'),
    ("sporefile: 1\nbase: {image: d}\n", '1:1: name: missing required key "name"'),
    (
        "sporefile: 1\nname: a\nbase: {platform: linux/amd64}\n",
        '3:7: base.image: missing required key "image"',
    ),
    # names and identifiers
    ("sporefile: 1\nname: App\nbase: {image: d}\n", '2:7: name: "App" is not a valid name'),
    ('sporefile: 1\nname: "a\\n"\nbase: {image: d}\n', '2:7: name: "a\\n" is not a valid name'),
    (
        "sporefile: 1\nname: a\nbase: {image: d, platform: amd64}\n",
        '3:28: base.platform: "amd64" is not a platform',
    ),
    ("sporefile: 1\nname: a\nbase:\n", "3:6: base: is empty; expected a mapping"),
    # sizes
    (
        HEAD + "machine:\n  memory: 512mb\n",
        '5:11: machine.memory: "512mb" is not a size; '
        "expected an integer with unit B, KiB, MiB or GiB",
    ),
    (HEAD + "machine:\n  memory: 1.5GiB\n", '5:11: machine.memory: "1.5GiB" is not a size'),
    (HEAD + "machine:\n  memory: -5\n", "5:11: machine.memory: -5 is out of range"),
    (HEAD + "machine:\n  memory: 0\n", "5:11: machine.memory: 0 is out of range"),
    (
        HEAD + "machine:\n  memory: 32MiB\n",
        "5:11: machine.memory: 32MiB is out of range; expected 64MiB to 64GiB",
    ),
    (HEAD + "machine:\n  memory: 65GiB\n", "machine.memory: 65GiB is out of range"),
    (HEAD + "machine:\n  memory: 101MiB\n", "machine.memory: 101MiB is not a multiple of 2MiB"),
    (
        HEAD + "machine: {vcpus: 0}\n",
        "4:18: machine.vcpus: 0 is out of range; expected an integer from 1 to 64",
    ),
    (HEAD + "machine: {vcpus: 65}\n", "machine.vcpus: 65 is out of range"),
    (HEAD + "machine: {vcpus: 1.0}\n", "machine.vcpus: 1.0 is a number, not a vCPU count"),
    (HEAD + "machine: {kernel: missing}\n", 'machine.kernel: "missing" does not exist'),
    (HEAD + "machine: {kernel: app}\n", 'machine.kernel: "app" is not a regular file'),
    # durations
    (
        HEAD
        + "steps:\n  - name: a\n    run: x\n  - name: b\n    run: y\n    timeout: 30 seconds\n",
        '9:14: steps[1].timeout: "30 seconds" is not a duration; expected e.g. 30s, 2m, 1m30s',
    ),
    (
        HEAD + "verify: [{run: x, timeout: 30}]\n",
        "4:28: verify[0].timeout: 30 is a number, not a duration; expected e.g. 30s",
    ),
    (HEAD + "verify: [{run: x, timeout: 1.5s}]\n", '"1.5s" is not a duration'),
    (HEAD + "verify: [{run: x, timeout: 0s}]\n", 'verify[0].timeout: "0s" is zero'),
    (HEAD + "verify: [{run: x, timeout: 25h}]\n", '"25h" is longer than 24h'),
    (HEAD + "verify: [{run: x, timeout: 24h1ms}]\n", '"24h1ms" is longer than 24h'),
    (
        HEAD + "steps:\n  - name: a\n    run: x\n    background: true\n"
        "    ready: {tcp: 80, timeout: soon}\n",
        '8:31: steps[0].ready.timeout: "soon" is not a',
    ),
    # env
    (
        HEAD + "env:\n  DEBUG: true\n",
        '5:10: env.DEBUG: true is a boolean, not a string; quote it: "true"',
    ),
    (HEAD + "env: {N: 1}\n", 'env.N: 1 is a number, not a string; quote it: "1"'),
    (HEAD + "env: {N: }\n", "4:9: env.N: is empty"),
    (HEAD + "env: {1X: a}\n", '4:7: env.1X: "1X" is not a valid variable name'),
    (HEAD + "env: {yes: a}\n", '4:7: env.yes: key "yes" is read by YAML as a boolean'),
    (
        HEAD + "steps:\n  - name: a\n    run: x\n    env: {A-B: x}\n",
        '7:11: steps[0].env.A-B: "A-B" is not a valid variable name',
    ),
    # files
    (
        HEAD + "files:\n  - {src: ../etc, dst: /x}\n",
        '5:11: files[0].src: "../etc" leaves the build context',
    ),
    (HEAD + "files:\n  - {src: app/../../x, dst: /x}\n", 'files[0].src: "app/../../x" leaves'),
    (
        HEAD + "files:\n  - {src: /etc/passwd, dst: /x}\n",
        '5:11: files[0].src: "/etc/passwd" is not a relative path',
    ),
    (HEAD + "files:\n  - {src: nope, dst: /x}\n", 'files[0].src: "nope" does not exist'),
    (
        HEAD + "files:\n  - {src: app, dst: app}\n",
        '5:21: files[0].dst: "app" is not an absolute path',
    ),
    (HEAD + "files:\n  - {src: app, dst: /a/../etc}\n", 'files[0].dst: "/a/../etc" contains'),
    (
        HEAD + "files:\n  - {src: app, dst: /x, mode: 755}\n",
        "5:31: files[0].mode: 755 is not "
        'written in octal; write the mode as a quoted octal string, e.g. "0755"',
    ),
    (
        HEAD + "files:\n  - {src: app, dst: /x, mode: '0759'}\n",
        'files[0].mode: "0759" is not a file mode',
    ),
    (HEAD + "files:\n  - {src: app, dst: /x, mode: 010000}\n", "files[0].mode: 010000 is out of"),
    (HEAD + "files:\n  - {src: app}\n", '5:5: files[0].dst: missing required key "dst"'),
    # steps
    (
        HEAD + "steps:\n  - {name: a, run: x, ready: {tcp: 80}}\n",
        "5:23: steps[0].ready: ready is only allowed on a background step; add background: true",
    ),
    (
        BG + "    ready: {tcp: 1, file: /f}\n",
        "8:12: steps[0].ready: file and tcp are all set; expected exactly one of file",
    ),
    (
        HEAD + "steps:\n  - name: a\n    run: x\n    background: true\n    ready: {timeout: 3s}\n",
        "steps[0].ready: none of file, tcp, command is set",
    ),
    (
        HEAD + "steps:\n  - name: a\n    run: x\n    background: true\n    ready: {tcp: 70000}\n",
        "8:18: steps[0].ready.tcp: 70000 is out of range; expected a port number",
    ),
    (HEAD + "steps:\n  - {name: a, run: []}\n", "5:20: steps[0].run: has 0 entries"),
    (HEAD + "steps:\n  - {name: a, run: ''}\n", "5:20: steps[0].run: is empty"),
    (HEAD + "steps:\n  - {name: a, run: '  '}\n", 'steps[0].run: "  " is not a command'),
    (
        HEAD + "steps:\n  - {name: a, run: [sleep, 10]}\n",
        '5:28: steps[0].run[1]: 10 is a number, not a string; quote it: "10"',
    ),
    (HEAD + "steps:\n  - {name: a, run: ['', x]}\n", "steps[0].run[0]: is empty"),
    (
        HEAD + "steps:\n  - {name: a, run: x, background: yes please}\n",
        'steps[0].background: "yes please" is a string, not a boolean',
    ),
    (
        HEAD + "steps:\n  - {name: a, run: x}\n  - {name: a, run: y}\n",
        '6:12: steps[1].name: duplicate step name "a" (first at line 5)',
    ),
    (HEAD + "steps:\n  - {name: A, run: x}\n", 'steps[0].name: "A" is not a valid step name'),
    (HEAD + "steps:\n  - {run: x}\n", 'steps[0].name: missing required key "name"'),
    (
        HEAD + "steps:\n  - {name: a, run: x}\nsnapshot: {after: b}\n",
        '6:19: snapshot.after: no step is named "b"; expected one of: a',
    ),
    (
        HEAD + "snapshot: {after: b}\n",
        'snapshot.after: no step is named "b"; the Sporefile has no steps',
    ),
    (HEAD + "workdir: srv\n", '4:10: workdir: "srv" is not an absolute path'),
    # output
    (HEAD + "output: {spore: ../x.spore}\n", '4:17: output.spore: "../x.spore" leaves the build'),
    (HEAD + "output: {bundle: /tmp/x}\n", 'output.bundle: "/tmp/x" is not a relative path'),
    (HEAD + "output: {spore: out/a, bundle: out/a}\n", '4:32: output.bundle: "out/a" cannot be'),
    (HEAD + "output: {spore: ./}\n", 'output.spore: "./" cannot be used as an output path'),
    (HEAD + "output: {spore: Sporefile}\n", 'output.spore: "Sporefile" cannot be used as an'),
    (HEAD + "output: {bundle: app}\n", 'output.bundle: "app" cannot be used as an output path'),
    # YAML constructs
    (HEAD + "env:\n  A: x\n  A: y\n", '6:3: env.A: duplicate key "A" (first at line 5)'),
    (HEAD + "env: {A: &v x, B: y}\n", "4:10: env.A: YAML anchors (&name) are not allowed"),
    (HEAD + "env: {A: x, B: *v}\n", "4:16: env.B: YAML aliases (*name) are not allowed"),
    (HEAD + "<<: {name: b}\n", '4:1: ["<<"]: YAML merge keys (<<) are not allowed'),
    (
        HEAD + "env: {A: !!python/name:os.system x}\n",
        '4:10: env.A: tag "!!python/name:os.system" is not allowed',
    ),
    (HEAD + "env: {A: !custom x}\n", 'env.A: tag "!custom" is not allowed'),
    (HEAD + "env: {A: !!binary aGk=}\n", 'env.A: tag "!!binary" is not allowed'),
    (HEAD + "env: !!set {A: x}\n", 'env: tag "!!set" is not allowed'),
    (HEAD + "---\nname: b\n", "4:1: a second YAML document starts here"),
    (HEAD + 'env: {A: "\\0"}\n', "4:10: env.A: contains a NUL character"),
    (HEAD + 'env: {A: "\\ud800"}\n', "env.A: contains an unpaired surrogate"),
    (HEAD + "env: {A: !!int 12x}\n", 'env.A: "12x" is not a number'),
    (HEAD + "machine: {vcpus: " + "1" * 100 + "}\n", "machine.vcpus: number"),
    (HEAD + "env: {A: x\n", "5:1: invalid YAML: while parsing a flow mapping"),
    (HEAD + "env:\n\tA: x\n", "5:1: invalid YAML:"),
    (HEAD + "env: {A: \x01}\n", "4:10: invalid YAML: character U+0001 is not allowed"),
    ("", "1:1: the file is empty"),
    ("# only a comment\n", "1:1: the file is empty"),
    ("- a\n", "1:1: (document): the document is a list, not a mapping"),
    (HEAD + "env: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than 16 levels"),
    (HEAD + "env: [" + "a, " * 10_001 + "]\n", "more than 10000 keys and values"),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[e[:40] for _, e in BAD])
def test_rejects(ctx: Path, text: str, expected: str) -> None:
    msg = error(ctx, text)
    assert f"{ctx / 'Sporefile'}:{expected}" in msg or expected in msg, msg
    if re.match(r"\d+:\d+: ", expected):
        assert msg.startswith(f"{ctx / 'Sporefile'}:{expected}"), msg
    # one line of the form file:line:col: [path: ]problem; expectation
    assert re.fullmatch(r".+:\d+:\d+: .+; .+", msg), msg


def test_src_escaping_through_symlink(ctx: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret").write_text("x")
    os.symlink(outside, ctx / "link")
    os.symlink("link/secret", ctx / "file-link")
    text = HEAD + "files:\n  - {src: file-link, dst: /x}\n"
    msg = error(ctx, text)
    assert ':5:11: files[0].src: "file-link" resolves to' in msg
    assert "outside the build context" in msg
    msg = error(ctx, HEAD + "files:\n  - {src: link/secret, dst: /x}\n")
    assert "outside the build context" in msg
    msg = error(ctx, HEAD + "output: {spore: link/x.spore}\n")
    assert "output.spore" in msg and "outside the build context" in msg
    os.symlink("loop", ctx / "loop")
    assert "files[0].src" in error(ctx, HEAD + "files:\n  - {src: loop, dst: /x}\n")
    os.symlink(outside / "secret", ctx / "kernel")
    assert "machine.kernel" in error(ctx, HEAD + "machine: {kernel: kernel}\n")


def test_symlink_inside_context_is_followed(ctx: Path) -> None:
    os.symlink("app/serve", ctx / "serve-link")
    sf = load(write(ctx, HEAD + "files:\n  - {src: serve-link, dst: /x}\n"))
    assert sf.files[0].src == (ctx / "app" / "serve").resolve()
    assert sf.files[0].src_rel == "serve-link"


def test_file_level_rejections(ctx: Path) -> None:
    big = HEAD + "# " + "x" * (1 << 20) + "\n"
    assert "over the limit of 1048576" in error(ctx, big)
    msg = error(ctx, HEAD.encode() + b"env: {A: \xff}\n")
    assert msg.startswith(f"{ctx / 'Sporefile'}:4:10: byte 0xff is not valid UTF-8")
    with pytest.raises(SporefileError, match="cannot read the Sporefile"):
        load(ctx / "missing")
    with pytest.raises(SporefileError, match="not a regular file"):
        load(ctx / "app")
    os.mkfifo(ctx / "fifo")
    with pytest.raises(SporefileError, match="not a regular file"):
        load(ctx / "fifo")


def test_first_error_in_document_order(ctx: Path) -> None:
    text = HEAD + "machine: {memory: lots}\nfoo: 1\nworkdir: x\n"
    assert ":4:19: machine.memory:" in error(ctx, text)


def test_schema_is_valid_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(sporefile.schema())


def test_docs_example_loads(ctx: Path) -> None:
    docs = Path(__file__).resolve().parent.parent / "docs" / "sporefile.md"
    example = docs.read_text().split("```yaml\n", 1)[1].split("```", 1)[0]
    (ctx / "bin").mkdir()
    (ctx / "bin" / "serve").write_text("#!/bin/sh\n")
    sf = load(write(ctx, example))
    assert [s.name for s in sf.steps] == ["deps", "build", "server"]
    assert sf.files[1].mode == 0o755 and sf.snapshot_after == "server"


@pytest.mark.parametrize("name", sorted(p.name for p in VALID.glob("*.yaml")))
def test_valid_fixtures_load(ctx: Path, name: str) -> None:
    load(write(ctx, (VALID / name).read_text()))


class _Remembered:
    """sporefile_schema.Verdicts kept in a set (the build keeps them in its store)."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.asked = 0

    def known_valid(self, key: str) -> bool:
        self.asked += 1
        return key in self.keys

    def record_valid(self, key: str) -> None:
        self.keys.add(key)


def test_schema_verdicts_remember_only_valid_documents_by_content(tmp_path: Path) -> None:
    from sporevm.pipeline.driver import StoreVerdicts
    from sporevm.store import Store

    good = b"sporefile: 1\nname: app\nbase: {image: busybox}\n"
    bad = b"sporefile: 1\nname: App\nbase: {image: busybox}\n"
    seen = _Remembered()
    sporefile.loads(good, tmp_path / "Sporefile", verdicts=seen)
    assert len(seen.keys) == 1
    with pytest.raises(SporefileError, match="name"):
        sporefile.loads(bad, tmp_path / "Sporefile", verdicts=seen)
    assert len(seen.keys) == 1  # a refused document is never remembered
    # The same value spelled differently is the same document; another value is not.
    sporefile.loads(
        b"sporefile: 1\nbase: {image: busybox}\nname: app\n", tmp_path / "S", verdicts=seen
    )
    assert len(seen.keys) == 1
    sporefile.loads(good.replace(b"app", b"app2"), tmp_path / "Sporefile", verdicts=seen)
    assert len(seen.keys) == 2
    # A planted verdict for a different document cannot pass an invalid one.
    seen.keys.add("0" * 64)
    with pytest.raises(SporefileError):
        sporefile.loads(bad, tmp_path / "Sporefile", verdicts=seen)
    # In the store: remembered across processes, as records prune may drop.
    store_verdicts = StoreVerdicts(Store(tmp_path / "home"))
    sporefile.loads(good, tmp_path / "Sporefile", verdicts=store_verdicts)
    doc = sporefile_yaml.Doc("S", sporefile_yaml.compose("S", good.decode()))
    key = sporefile_schema.verdict_key(doc)
    assert key is not None and key in seen.keys and store_verdicts.known_valid(key)
