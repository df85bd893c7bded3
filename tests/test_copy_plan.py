"""`spore run --copy-in/--copy-out` arguments: how they split, and what is refused before
any VM starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from sporevm.build.copies import check_plan, make_plan, parse_copy_in, parse_copy_out
from sporevm.errors import CopyError, UsageError


def test_specs_split_on_the_guest_side(tmp_path: Path) -> None:
    ci = parse_copy_in(f"{tmp_path}/a:b:/work/./x/")
    assert (ci.host, ci.guest) == (tmp_path / "a:b", "/work/x")
    co = parse_copy_out(f"/work/out:{tmp_path}/r:1")
    assert (co.guest, co.host) == ("/work/out", tmp_path / "r:1")
    assert parse_copy_in("rel:/w").host == Path.cwd() / "rel"


@pytest.mark.parametrize(
    ("copy_in", "copy_out", "owner", "match"),
    [
        (["nocolon"], [], None, "HOST_PATH:GUEST_PATH"),
        (["a:relative"], [], None, "absolute"),
        ([], ["/g"], None, "GUEST_PATH:HOST_DIR"),
        ([], ["rel:/h"], None, "absolute"),
        ([], [], "1000", "UID:GID"),
        ([], [], "-1:0", "UID:GID"),
        ([], [], "4294967295:0", "UID:GID"),
    ],
)
def test_usage_errors(
    copy_in: list[str], copy_out: list[str], owner: str | None, match: str
) -> None:
    with pytest.raises(UsageError, match=match):
        make_plan(copy_in, copy_out, owner)


def test_checked_before_a_vm(tmp_path: Path) -> None:
    with pytest.raises(CopyError, match="does not exist"):
        check_plan(make_plan([f"{tmp_path}/missing:/w"], []))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(CopyError, match="not empty"):
        check_plan(make_plan([], [f"/g:{tmp_path}/full"]))
    with pytest.raises(UsageError, match="named twice"):
        check_plan(make_plan([], [f"/a:{tmp_path}/o", f"/b:{tmp_path}/o"]))
    plan = make_plan([], [f"/a:{tmp_path}/new"], "1000:100", 5, 7)
    check_plan(plan)
    assert (plan.owner, plan.bounds.max_bytes, plan.bounds.max_entries) == ((1000, 100), 5, 7)
