"""The spore format: manifest, chunk store, spore directory, fork, the VM-state schema
(``vmstate.py``, ``x86.py``), the platform contract (``platform.py``) and what a
backend implements to produce and consume it (``backend.py``).

It imports no VMM and no runtime (tests/test_layering.py): code that only reads or
moves spores (inspect, verify, pack, unpack, push, pull) never loads a hypervisor.
"""
