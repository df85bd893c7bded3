"""virtio devices over the virtio-mmio v2 transport (see docs/devices.md)."""

from .blk import BlkDevice
from .console import ConsoleDevice
from .device import VirtioDevice
from .mmio import WINDOW, VirtioMmio, kernel_cmdline
from .net import NetDevice
from .queue import ChainError, DescriptorChain, QueueError, Segment, Virtqueue
from .rng import RngDevice
from .state import VirtioStateError

__all__ = [
    "WINDOW",
    "BlkDevice",
    "ChainError",
    "ConsoleDevice",
    "DescriptorChain",
    "NetDevice",
    "QueueError",
    "RngDevice",
    "Segment",
    "VirtioDevice",
    "VirtioMmio",
    "VirtioStateError",
    "Virtqueue",
    "kernel_cmdline",
]
