"""Fuzz the spore bundle OCI artifact manifest decoder: only SporeError may escape, and
whatever decodes re-encodes to exactly the input bytes (one manifest, one digest)."""

import sys

import atheris

with atheris.instrument_imports():
    from sporevm.dist import transport_oci
    from sporevm.errors import SporeError


def TestOneInput(data: bytes) -> None:
    try:
        files, digest = transport_oci.decode_artifact(data, "fuzz")
    except SporeError:
        return
    assert (
        transport_oci.encode_artifact(
            [(name, d, size) for name, (d, size) in files.items()], digest
        )
        == data
    )


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
