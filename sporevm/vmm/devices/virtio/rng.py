"""virtio-rng (device id 4): fill device-writable buffers from the host's os.urandom.

One queue (requestq). Each request is filled up to MAX_REQUEST bytes; a larger
buffer is filled partially and the used length says how much, as the spec
allows. Readable segments in a request are ignored.
"""

from __future__ import annotations

import os

from .device import VirtioDevice

DEVICE_ID = 4
QUEUE_SIZE = 64
MAX_REQUEST = 64 * 1024  # bytes of entropy per request: bounds the host-side buffer


class RngDevice(VirtioDevice):
    device_id = DEVICE_ID
    queue_max_sizes = (QUEUE_SIZE,)

    def notify(self, index: int) -> None:
        q = self.queues[index]
        done = False
        for _ in range(q.size):
            chain = q.pop()
            if chain is None:
                break
            n = min(chain.writable_len, MAX_REQUEST)
            written = chain.scatter(self.mem, 0, os.urandom(n)) if n else 0
            q.push_used(chain.head, written)
            done = True
        if done:
            self.link.signal_used(index)
