"""Guests on the network, end to end, as a user runs them (issue 14).

Real guests (the managed kernel, busybox or Debian minbase), real gateways and passt:

- a VM without a network has only ``lo``;
- a fresh VM with ``--net-allow`` reaches an allowed address and an allowed name, and
  is refused (and each refusal logged) on this machine's own address and the gateway's,
  where a listener waits and sees nothing, and at DNS for an unlisted name;
- a spore built with ``network:`` records its policy and resumes with working DNS and
  egress again; ``--net-allow`` narrows it;
- the issue's acceptance example: Debian bookworm minbase, ``network: {allow: [<the
  Debian mirror of this machine's apt sources>]}``, ``apt-get install -y hello``, then
  ``spore run --from`` prints ``Hello, world!``.

Traffic stays on this machine: everything but the apt example runs inside two network
namespaces the test makes (tests/egress_netns.py: "this machine" at 198.51.100.1, the
"internet" at 198.51.100.2), with a fake DNS server; the apt example talks only to the
Debian mirror this machine's apt already uses, read from its sources at run time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ociimage  # tools/, on sys.path via conftest (as in test_oci.py)
import pytest

from sporevm.spore import manifest
from tests import egress_netns as nets
from tests.conftest import ROOT, PushedImage
from tests.test_kernel import KERNEL_STORE, built_kernel  # noqa: F401  (shared fixture)
from tests.test_vm_e2e import busybox_rootfs, spore  # noqa: F401  (shared fixture)

pytestmark = [pytest.mark.vm, pytest.mark.kernelbuild]

HTTP_PORT, TRAP_PORT = 8000, 8001
BODY = b"hello from the stand-in internet\n"
# Each wget on its own line with its exit status: the refusals must be fast (a RST or
# REFUSED), never a timeout.
PROBES = f"""\
wget -q -O- http://{nets.SERVER_ADDR}:{HTTP_PORT}/hello.txt; echo "cidr=$?"
wget -q -O- http://direct.test:{HTTP_PORT}/hello.txt; echo "name=$?"
wget -q -O- http://{nets.CLIENT_ADDR}:{TRAP_PORT}/; echo "host=$?"
wget -q -O- http://10.0.2.2:{TRAP_PORT}/; echo "gateway=$?"
wget -q -O- http://other.test:{HTTP_PORT}/; echo "unlisted=$?"
cat /etc/resolv.conf
"""


def skip_reason() -> str | None:
    return nets.available()


@dataclass
class Rig:
    net: nets.Net
    trap: subprocess.Popen[bytes]

    def spore(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """`spore ARGS` as a user on "this machine" (the client namespace) runs it."""
        return subprocess.run(
            [*self.net.exec(self.net.client), sys.executable, "-m", "sporevm.cli", *args],
            capture_output=True,
            text=True,
            env={**os.environ, "SPORE_HOME": str(KERNEL_STORE)},
            cwd=ROOT,
            timeout=timeout,
        )

    def trap_saw_nothing(self) -> None:
        with pytest.raises(AssertionError, match="no line"):
            print("trap:", nets.wait_for_line(self.trap, timeout=0.5))


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    why = skip_reason()
    if why is not None:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("net-e2e")
    (tmp / "www").mkdir()
    (tmp / "www" / "hello.txt").write_bytes(BODY)
    py = [sys.executable, "-m"]
    with nets.namespaces() as net:
        # `ip netns exec` shows /etc/netns/NAME/resolv.conf as /etc/resolv.conf: the
        # gateway then asks the fake DNS server, as it would the host's resolver.
        etc = Path("/etc/netns") / net.client
        etc.mkdir(parents=True)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
            kw: dict[str, Any] = {"stdout": subprocess.PIPE, "cwd": ROOT}
            dnsd = nets.spawn(net, net.client, [*py, "tests.egress_netns", "dnsd", "53"], **kw)
            trap = nets.spawn(
                net,
                net.client,
                [*py, "tests.egress_netns", "trap", str(TRAP_PORT), "127.0.0.1", nets.CLIENT_ADDR],
                **kw,
            )
            http = nets.spawn(
                net,
                net.server,
                [*py, "http.server", str(HTTP_PORT), "--bind", nets.SERVER_ADDR],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=tmp / "www",
            )
            procs += [dnsd, trap, http]
            assert nets.wait_for_line(dnsd) == b"ready\n"
            assert nets.wait_for_line(trap) == b"ready\n"
            yield Rig(net, trap)
        finally:
            for p in procs:
                nets.stop(p)
            shutil.rmtree(etc, ignore_errors=True)
            with contextlib.suppress(OSError):
                etc.parent.rmdir()  # /etc/netns, if this test made it and nothing else uses it


def events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def flows(log: Path, dst: str, port: int) -> list[dict[str, Any]]:
    return [
        e for e in events(log) if e["event"] == "flow" and (e["dst"], e["dport"]) == (dst, port)
    ]


def check_probes(out: str, log: Path, rig: Rig) -> None:
    lines = out.splitlines()
    assert BODY.decode().strip() in lines
    for want in ("cidr=0", "name=0", "host=1", "gateway=1", "unlisted=1"):
        assert want in lines, out
    assert "nameserver 10.0.2.2" in lines, out
    [allowed] = flows(log, nets.SERVER_ADDR, HTTP_PORT)[:1]
    assert allowed["allow"] is True and allowed["reason"] == "cidr", allowed
    for dst in (nets.CLIENT_ADDR, "10.0.2.2"):
        refused = flows(log, dst, TRAP_PORT)
        assert refused and not refused[0]["allow"], (dst, refused)
        assert refused[0]["reason"].startswith("floor:"), refused
    dns = [e for e in events(log) if e["event"] == "dns"]
    assert any(e["name"] == "direct.test" and e["allow"] for e in dns), dns
    assert any(
        e["name"] == "other.test" and not e["allow"] and e["reason"] == "name-not-allowed"
        for e in dns
    ), dns
    rig.trap_saw_nothing()


def test_no_network_means_only_lo(busybox_rootfs: Path) -> None:  # noqa: F811
    proc = spore("run", "-q", "--rootfs", str(busybox_rootfs), "--", "ls", "/sys/class/net")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["lo"]


def test_fresh_vm_under_policy(rig: Rig, busybox_rootfs: Path, tmp_path: Path) -> None:  # noqa: F811
    log = tmp_path / "net.log"
    proc = rig.spore(
        "run",
        "-q",
        "--rootfs",
        str(busybox_rootfs),
        "--net-allow",
        f"{nets.SERVER_ADDR[:-1]}0/24",
        "--net-allow",
        "direct.test",
        "--net-log",
        str(log),
        "--",
        "sh",
        "-c",
        "ls /sys/class/net; " + PROBES,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:2] == ["eth0", "lo"], proc.stdout
    check_probes(proc.stdout, log, rig)
    start = events(log)[0]
    assert start["event"] == "start" and start["jail"].endswith("+seccomp"), start


def test_policy_errors_are_one_line_before_any_vm(busybox_rootfs: Path) -> None:  # noqa: F811
    proc = spore("run", "--rootfs", str(busybox_rootfs), "--net-allow", "10.1.2.3", "--", "true")
    assert proc.returncode != 0
    assert "inside the floor" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


NET_SPOREFILE = """\
sporefile: 1
name: netspore
base:
  image: oci-layout:{layout}:latest
machine: {{memory: 256MiB}}
network: {{allow: [direct.test, "{cidr}"]}}
env: {{TOKEN: "{token}"}}
steps:
  - name: fetch
    run: wget -q -O /root/got.txt http://direct.test:{http}/hello.txt && echo $TOKEN
"""


def test_networked_spore_resumes_with_its_network(
    rig: Rig,
    busybox_image: PushedImage,
    busybox_rootfs: Path,  # noqa: F811  (builds the kernel first)
    tmp_path: Path,
) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    sf = NET_SPOREFILE.format(
        layout=busybox_image.layout,
        cidr=f"{nets.SERVER_ADDR[:-1]}0/24",
        token=uuid.uuid4().hex,
        http=HTTP_PORT,
    )
    (ctx / "Sporefile").write_text(sf)
    proc = rig.spore("build", str(ctx / "Sporefile"))
    assert proc.returncode == 0, proc.stderr
    spore_dir = ctx / "out" / "netspore.spore"
    m = manifest.decode((spore_dir / "manifest.json").read_bytes())
    assert m.network == (f"{nets.SERVER_ADDR[:-1]}0/24", "direct.test")
    assert m.platform.device_model == "spore-board-net/2"
    # The recorded policy applies again: DNS and egress work after the restore.
    log = tmp_path / "restored.log"
    proc = rig.spore(
        "run", "-q", "--from", str(spore_dir), "--net-log", str(log), "--",
        "sh", "-c", "cat /root/got.txt; " + PROBES,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(BODY.decode()), proc.stdout
    check_probes(proc.stdout, log, rig)
    # Narrowed: the CIDR only, so the name is refused at DNS now.
    proc = rig.spore(
        "run", "-q", "--from", str(spore_dir), "--net-allow", f"{nets.SERVER_ADDR[:-1]}0/24",
        "--", "sh", "-c", PROBES,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "cidr=0" in proc.stdout and "name=1" in proc.stdout, proc.stdout


APT_SPOREFILE = """\
sporefile: 1
name: apt-hello
base:
  image: {image}
machine: {{memory: 512MiB}}
network: {{allow: [{mirror}]}}
env: {{TOKEN: "{token}"}}  # fresh step keys: the kernel store is shared between runs
steps:
  - name: hello
    run: apt-get update && apt-get install -y hello
"""


@pytest.mark.minbase
def test_apt_install_hello_then_run_from(
    minbase_image: PushedImage,
    busybox_rootfs: Path,  # noqa: F811  (builds the kernel first)
    tmp_path: Path,
) -> None:
    mirror = urlsplit(ociimage.debian_mirror()).hostname
    assert mirror
    ctx = tmp_path / "apt"
    ctx.mkdir()
    image = f"oci-layout:{minbase_image.layout}:{minbase_image.tag}"
    (ctx / "Sporefile").write_text(
        APT_SPOREFILE.format(image=image, mirror=mirror, token=uuid.uuid4().hex)
    )
    # On kvm_pvm the guest kernel runs emulated and every guest syscall costs
    # milliseconds: apt-get update and install take many minutes there.
    proc = spore("build", str(ctx / "Sporefile"), timeout=3600)
    assert proc.returncode == 0, proc.stderr
    log = tmp_path / "run.log"
    spore_dir = ctx / "out" / "apt-hello.spore"
    proc = spore("run", "-q", "--from", str(spore_dir), "--net-log", str(log), "--", "hello")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Hello, world!\n"
    assert events(log)[0]["policy"] == [mirror]  # the recorded policy, applied again
