"""Fuzz the resident server's wire format (sporevm/cli/serverwire.py): a request frame
as the server reads it from a client, and reply records as the client reads them.

Only WireError may escape. A decoded request satisfies the documented bounds and
encodes back to the very same frame; a decoded reply is in range.
"""

import sys

import atheris

with atheris.instrument_imports():
    from sporevm.cli import serverwire as wire


def TestOneInput(data: bytes) -> None:
    try:
        req = wire.decode_request(data)
    except wire.WireError:
        pass
    else:
        assert req.cwd.startswith("/") and 0 <= req.umask <= 0o777
        assert len(req.argv) <= wire.MAX_ARGS and len(req.env) <= wire.MAX_ENV
        assert all(name and "=" not in name for name in req.env)
        assert wire.encode_request(req) == data
    buf = data
    while buf:
        try:
            rec = wire.decode_reply(buf)
        except wire.WireError:
            return
        if rec is None:
            return
        kind, value, used = rec
        assert 0 < used <= len(buf)
        if kind == "X":
            assert isinstance(value, int) and 0 <= value <= 255
        elif kind == "P":
            assert isinstance(value, int) and value > 1
        buf = buf[used:]


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
