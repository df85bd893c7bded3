"""The guest's loopback is up, from the first step on and in every restore and fork (issue 12).

The agent brings ``lo`` up with 127.0.0.1/8 at boot (guest/net.c); before that
``connect(127.0.0.1:…)`` failed with ENETUNREACH, so a ``ready: {tcp: …}`` probe
waited out its timeout and no step could reach a local service. One real build
(cold boot ~20 s on kvm_pvm): busybox ``httpd`` as a background step gated by a
tcp probe, fetched with ``wget`` by a later step, by ``verify:`` (a fresh restore),
by ``spore run --from`` and by both children of ``spore fork``.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.conftest import PushedImage
from tests.test_kernel import built_kernel  # noqa: F401  (shared fixture)
from tests.test_vm_e2e import busybox_rootfs, spore  # noqa: F401  (shared fixture)

pytestmark = [pytest.mark.vm, pytest.mark.kernelbuild]

PORT = 8080
URL = f"http://127.0.0.1:{PORT}/index.html"

# The token (fresh per run) gives fresh step keys: the kernel store is shared between runs.
SPOREFILE = """\
sporefile: 1
name: loopback
base:
  image: oci-layout:{layout}:latest
machine: {{memory: 256MiB}}
env: {{TOKEN: "{token}"}}
workdir: /tmp
steps:
  - name: page
    run: mkdir -p /srv && echo "served $TOKEN" > /srv/index.html
  - name: server
    run: [httpd, -f, -p, "{port}", -h, /srv]
    background: true
    ready: {{tcp: {port}, timeout: 30s}}
  - name: fetch
    run: cat /sys/class/net/lo/flags && wget -qO- {url}
verify:
  - run: [wget, -qO-, "{url}"]
  - run: echo "token $TOKEN in $(pwd)"
"""

# lo's flags (0x9: IFF_UP | IFF_LOOPBACK), then the page the background server serves.
CHECK = f"cat /sys/class/net/lo/flags && wget -qO- {URL}"


def test_local_tcp_service_is_reachable_in_build_restore_and_fork(
    busybox_image: PushedImage,
    busybox_rootfs: Path,
    tmp_path: Path,  # noqa: F811
) -> None:
    token = uuid.uuid4().hex
    (tmp_path / "Sporefile").write_text(
        SPOREFILE.format(layout=busybox_image.layout, token=token, port=PORT, url=URL)
    )
    proc = spore("build", str(tmp_path / "Sporefile"))
    # Without loopback the tcp probe fails: "step server: not ready after 30 s".
    assert proc.returncode == 0, proc.stderr
    assert "fetch | 0x9\n" in proc.stderr  # lo is up in the cold-booted guest
    assert f"fetch | served {token}\n" in proc.stderr  # a later step reaches the server
    assert f"verify[0] | served {token}\n" in proc.stderr  # so does verify:, in a fresh restore
    # verify: checks get the top-level env and workdir, as the steps do
    assert f"verify[1] | token {token} in /tmp\n" in proc.stderr
    spore_dir = tmp_path / "out" / "loopback.spore"

    resumed = spore("run", "-q", "--from", str(spore_dir), "--", "sh", "-c", CHECK)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == f"0x9\nserved {token}\n"

    forks = spore(
        "fork", str(spore_dir), "--count", "2", "--out", str(tmp_path / "forks"), "--json"
    )
    assert forks.returncode == 0, forks.stderr
    children = json.loads(forks.stdout)["children"]
    assert len(children) == 2
    for child in children:
        run = spore("run", "-q", "--from", child["path"], "--", "sh", "-c", CHECK)
        assert run.returncode == 0, run.stderr
        assert run.stdout == f"0x9\nserved {token}\n"
