"""Bundle URI parsing: what is accepted, what is refused, and canonical round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sporevm.dist.uri import BundleURI, URIError, parse_pull_uri, parse_push_uri, parse_uri

PIN = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"file:///srv/bundles/app@{PIN}", BundleURI("file", path="/srv/bundles/app", pin=PIN)),
        (f"file:///srv/a%20b@{PIN}", BundleURI("file", path="/srv/a%20b", pin=PIN)),  # literal %
        (
            f"oci://127.0.0.1:5000/spores/app@{PIN}",
            BundleURI("oci", host="127.0.0.1", port=5000, repo="spores/app", pin=PIN),
        ),
        (
            f"oci://Registry.Example.com/a/b-c/d__e:v1.2@{PIN}",
            BundleURI("oci", host="registry.example.com", repo="a/b-c/d__e", tag="v1.2", pin=PIN),
        ),
        (f"oci://[::1]:5000/x@{PIN}", BundleURI("oci", host="::1", port=5000, repo="x", pin=PIN)),
        (
            f"s3://my-bucket/spores/app@{PIN}",
            BundleURI("s3", bucket="my-bucket", prefix="spores/app", pin=PIN),
        ),
        (f"s3://my.bucket@{PIN}", BundleURI("s3", bucket="my.bucket", pin=PIN)),
        (
            f"https://cdn.example.com/b/app-1.0@{PIN}",
            BundleURI("https", host="cdn.example.com", path="/b/app-1.0", pin=PIN),
        ),
        (f"http://127.0.0.1:8080/@{PIN}", BundleURI("http", host="127.0.0.1", port=8080, pin=PIN)),
    ],
)
def test_accepted(text: str, expected: BundleURI) -> None:
    uri = parse_pull_uri(text)
    assert uri == expected
    assert parse_pull_uri(str(uri)) == uri


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("ftp://host/x", "scheme"),
        ("FILE:///x", "scheme"),
        ("file://relative/path", "absolute"),
        ("file://host/abs", "absolute"),
        (f"file:///a/../b@{PIN}", r"'\.\.'"),
        (f"file:///a//b@{PIN}", "empty"),
        (f"file:///a/b/@{PIN}", "empty"),
        (f"file:///a?x=1@{PIN}", "query"),
        (f"file:///a#frag@{PIN}", "fragment"),
        (f"file:///a b@{PIN}", "whitespace"),
        (f"file:///@{PIN}", "'/'"),
        (f"https://user:pw@host/x@{PIN}", "userinfo"),
        (f"https://host/x?token=1@{PIN}", "query"),
        (f"https://host/x#f@{PIN}", "fragment"),
        (f"https://host/a%2e%2e/x@{PIN}", "'%'"),
        (f"https://host/a/../x@{PIN}", r"'\.\.'"),
        (f"https://host/./x@{PIN}", r"'\.'"),
        (f"https://host:0/x@{PIN}", "port"),
        (f"https://host:99999/x@{PIN}", "port"),
        (f"https://host:8a/x@{PIN}", "port"),
        (f"https://ho_st/x@{PIN}", "host"),
        (f"https://1.2.3.999/x@{PIN}", "IPv4"),
        (f"https://[1.2.3.4]/x@{PIN}", "IPv6"),
        (f"https://host@{PIN}", "path"),
        (f"https://host/x\\y@{PIN}", "'\\\\'"),
        (f"oci://host/Upper@{PIN}", "lowercase"),
        (f"oci://host/a:bad:tag@{PIN}", "lowercase|tag"),
        (f"oci://host@{PIN}", "oci://host"),
        (f"oci://host/x:-tag@{PIN}", "tag"),
        (f"s3://B/x@{PIN}", "bucket"),
        (f"s3://ab/x@{PIN}", "bucket"),
        (f"s3://bucket/@{PIN}", "trailing"),
        (f"s3://bucket/a//b@{PIN}", "empty"),
        ("s3://bucket/x@sha256:ABC", "pin"),
        ("s3://bucket/x@sha512:" + "0" * 128, "pin"),
        (f"s3://bucket/x@{PIN}@{PIN}", "one '@'"),
        ("file:///x" + "/y" * 3000 + f"@{PIN}", "longer"),
    ],
)
def test_rejected(text: str, why: str) -> None:
    with pytest.raises(URIError, match=why):
        parse_pull_uri(text)


@pytest.mark.parametrize(
    "text", ["file:///srv/b", "s3://bucket/p", "https://h/p", "oci://h/r", "oci://h/r:v1"]
)
def test_pull_needs_a_pin(text: str) -> None:
    with pytest.raises(URIError, match=r"not pinned; append @sha256:"):
        parse_pull_uri(text)


def test_allow_mutable_only_for_oci_tags() -> None:
    assert parse_pull_uri("oci://h:5000/r:v1", allow_mutable=True).tag == "v1"
    for text in ("oci://h/r", "s3://bucket/p", "file:///x", "https://h/p"):
        with pytest.raises(URIError, match="only applies to oci://host/repo:tag"):
            parse_pull_uri(text, allow_mutable=True)


def test_push_policy() -> None:
    assert parse_push_uri("oci://127.0.0.1:5000/spores/app").repo == "spores/app"
    assert parse_push_uri("s3://bucket/p").prefix == "p"
    with pytest.raises(URIError, match="read-only"):
        parse_push_uri("https://h/p")
    with pytest.raises(URIError, match="no @sha256 pin"):
        parse_push_uri(f"file:///srv/b@{PIN}")


_seg = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,8}", fullmatch=True)
_uris = st.one_of(
    st.builds(
        lambda p: BundleURI("file", path="/" + "/".join(p), pin=PIN),
        st.lists(_seg, min_size=1, max_size=4),
    ),
    st.builds(
        lambda p, port: BundleURI("oci", host="127.0.0.1", port=port, repo="/".join(p), pin=PIN),
        st.lists(st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True), min_size=1, max_size=3),
        st.none() | st.integers(1, 65535),
    ),
    st.builds(
        lambda b, p: BundleURI("s3", bucket=b, prefix="/".join(p), pin=PIN),
        st.from_regex(r"[a-z0-9][a-z0-9-]{1,10}[a-z0-9]", fullmatch=True),
        st.lists(_seg, max_size=3),
    ),
    st.builds(
        lambda p: BundleURI("https", host="h.example", path="".join("/" + x for x in p), pin=PIN),
        st.lists(_seg, max_size=3),
    ),
)


@settings(max_examples=300, deadline=None)
@given(_uris)
def test_canonical_round_trip(uri: BundleURI) -> None:
    assert parse_uri(str(uri)) == uri


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=120))
def test_arbitrary_text_is_a_uri_or_a_one_line_error(text: str) -> None:
    try:
        uri = parse_uri(text)
    except URIError as exc:
        assert "\n" not in str(exc)
        return
    assert parse_uri(str(uri)) == uri
