"""Remote build-cache metadata and URIs (sporevm/pipeline/cache_entry.py, remote_cache.py):
strict, canonical, fail-closed; every defect is one line. The caches themselves, end to
end, are in test_remote_cache.py."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sporevm import sporefile
from sporevm.build.context import BuildOptions
from sporevm.build.progress import Reporter
from sporevm.errors import SporefileError, UsageError
from sporevm.pipeline import cache_entry
from sporevm.pipeline.cache_entry import CacheEntryError, FileRef, GuestEntry, Ref
from sporevm.pipeline.driver import remote_caches
from sporevm.pipeline.remote_cache import parse_cache_uri
from sporevm.store import Store

HEX = st.text("0123456789abcdef", min_size=64, max_size=64)


def _hex(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def guest(**over: object) -> GuestEntry:
    files = {n: FileRef(1 + i, _hex(n)) for i, n in enumerate(cache_entry.FILES)}
    fields: dict[str, object] = {
        "host_class": "kvm",
        "kernel_key": _hex("k"),
        "agent_key": _hex("a"),
        "kernel": "blake3:" + _hex("1"),
        "vmlinux": "blake3:" + _hex("2"),
        "agent": "blake3:" + _hex("3"),
        "initrd": "blake3:" + _hex("4"),
        "files": files,
        **over,
    }
    return GuestEntry(**fields)  # type: ignore[arg-type]


@given(HEX, HEX, HEX, st.sampled_from(["kvm", "kvm-pvm"]), st.integers(1, 1 << 30))
def test_guest_entries_round_trip(a: str, b: str, c: str, hc: str, size: int) -> None:
    files = {n: FileRef(size, c) for n in cache_entry.FILES}
    e = guest(host_class=hc, kernel_key=a, agent_key=b, files=files)
    assert cache_entry.decode(e.encode()) == e


@given(HEX, HEX, st.one_of(st.none(), HEX))
def test_refs_round_trip(d: str, p: str, m: str | None) -> None:
    r = Ref("guest" if m is None else "bundle", "sha256:" + d, "sha256:" + p, m and "blake3:" + m)
    assert cache_entry.decode_ref(r.encode()) == r


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (guest().encode().replace(b'"kvm"', b'"tcg"'), "host_class"),
        (guest().encode()[:-1] + b',"x":1}', "fields differ"),
        (guest().encode().replace(b'{"agent"', b'{ "agent"'), "canonical"),
        (guest().encode().replace(b'"size":1}', b'"size":0}'), "size"),
        (guest().encode().replace(b'"size":1}', b'"size":1.0}'), "integers only"),
        (guest().encode().replace(b"spore-cache-guest/v1", b"spore-cache-guest/v2"), "v2"),
        (b'{"format":"spore-cache-guest/v1"}' + b" " * cache_entry.MAX_ENTRY, "larger"),
    ],
)
def test_a_bad_guest_entry_is_one_line(data: bytes, why: str) -> None:
    with pytest.raises(CacheEntryError, match=why) as err:
        cache_entry.decode(data)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("ref", "why"),
    [
        (Ref("bundle", "sha256:" + _hex("d"), "sha256:" + _hex("p"), None), "manifest"),
        (
            Ref("guest", "sha256:" + _hex("d"), "sha256:" + _hex("p"), "blake3:" + _hex("m")),
            "no manifest",
        ),
        (Ref("spore", "sha256:" + _hex("d"), "sha256:" + _hex("p"), None), "kind"),
        (Ref("guest", "sha256:" + _hex("d")[:63], "sha256:" + _hex("p"), None), "digest"),
    ],
)
def test_a_bad_pointer_is_refused(ref: Ref, why: str) -> None:
    with pytest.raises(CacheEntryError, match=why):
        cache_entry.decode_ref(ref.encode())


@pytest.mark.parametrize(
    ("text", "push", "why"),
    [
        ("oci://127.0.0.1:5000/cache/app:v1", False, "repository only"),
        ("file:///srv/c@sha256:" + "0" * 64, False, "no @sha256 pin"),
        ("https://example.test/c", True, "read-only"),
        ("ftp://x/y", False, "scheme"),
    ],
)
def test_cache_uris(text: str, push: bool, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        parse_cache_uri(text, for_push=push)


def test_cache_locations_name_pointers_and_objects_per_transport() -> None:
    f = parse_cache_uri("file:///srv/cache", for_push=True)
    assert str(f.at("step-ab")) == "file:///srv/cache/step-ab"
    s = parse_cache_uri("s3://bucket/ci", for_push=True)
    assert str(s.at("objects/12")) == "s3://bucket/ci/objects/12"
    o = parse_cache_uri("oci://127.0.0.1:5000/cache/app", for_push=True)
    assert str(o.at("step-ab")) == "oci://127.0.0.1:5000/cache/app:step-ab"


def test_the_sporefile_names_a_bad_cache_uri_and_flags_win(tmp_path: Path) -> None:
    (tmp_path / "Sporefile").write_text(
        "sporefile: 1\nname: c\nbase: {image: busybox}\n"
        "cache: {from: ['oci://127.0.0.1:5000/c/app:v1'], mode: min}\n"
    )
    sf = sporefile.load(tmp_path / "Sporefile")
    store, rep = Store(tmp_path / "home"), Reporter.quiet()
    with pytest.raises(SporefileError, match=r"Sporefile: cache\.from\.0: .*repository only"):
        remote_caches(sf, store, BuildOptions(), rep)
    caches = remote_caches(
        sf, store, BuildOptions(cache_from=("file:///srv/c",), cache_mode="max"), rep
    )
    assert caches is not None and [str(c) for c in caches.sources] == ["file:///srv/c"]
    assert caches.mode == "max" and caches.sinks == []
    assert (
        remote_caches(
            sporefile.load(tmp_path / "Sporefile"),
            store,
            BuildOptions(cache_from=("file:///a",)),
            rep,
        )
        is not None
    )
