"""Fuzz OCI manifest / index / config decoding: only SporeError may escape.

The first byte picks the decoder and the Content-Type hint; the rest is the
document. Whatever decodes is pushed through platform selection and the
config/manifest consistency check, which must also fail only with SporeError.
A selector with bit 7 set (and bit 0 clear) puts the document in an OCI layout
as its index.json and looks a tag up through the layout reader (oci.py).
"""

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from sporevm.build import oci
    from sporevm.build import ocimanifest as om
    from sporevm.errors import SporeError

_HINTS = (
    None,
    om.OCI_MANIFEST,
    om.OCI_INDEX,
    om.DOCKER_MANIFEST,
    om.DOCKER_LIST,
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
)
_PLATFORMS = tuple(
    om.parse_platform(p) for p in ("linux/amd64", "linux/arm64", "linux/arm/v7", "linux/amd64/v3")
)
_LAYOUT = Path(tempfile.mkdtemp(prefix="fuzz-oci-layout-"))
atexit.register(shutil.rmtree, _LAYOUT, True)  # in-process replays; libFuzzer skips atexit
(_LAYOUT / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def _layout(doc: bytes) -> None:
    (_LAYOUT / "index.json").write_bytes(doc)
    digest = oci._LayoutSource(_LAYOUT).find_tag("latest")
    assert digest.startswith("sha256:"), digest


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    selector, doc = data[0], data[1:]
    platform = _PLATFORMS[(selector >> 4) % len(_PLATFORMS)]
    try:
        if selector & 0x81 == 0x80:
            _layout(doc)
            return
        if selector & 1:
            config = om.decode_config(doc, what="fuzz: config")
            manifest = om.ImageManifest(
                om.OCI_MANIFEST,
                om.Descriptor(om.OCI_CONFIG, "sha256:" + "0" * 64, 1),
                tuple(om.LayerDesc(d, om.OCI_MANIFEST, 1) for d in config.diff_ids),
            )
            om.check_config(config, manifest, platform, what="fuzz")
            return
        hint = _HINTS[(selector >> 1) % len(_HINTS)]
        decoded = om.decode_manifest_or_index(doc, what="fuzz: manifest", media_type=hint)
        if isinstance(decoded, om.ImageIndex):
            entry = om.select_platform(decoded, platform, what="fuzz: index")
            assert entry.media_type in om.MANIFEST_TYPES
        else:
            for layer in decoded.layers:
                om.layer_compression(layer.media_type)
    except SporeError:
        return


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
