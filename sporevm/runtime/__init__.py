"""The VM runtime: the code that runs spores, and the only code that touches ``vmm``.

The monitor process and its zygote, the launcher that starts one and the typed
protocol both speak (``protocol.py``, its config line ``monitor_config.py``), the
monitor's jail policy, capture and restore over the backend protocol
(``sporevm.spore.backend``), lazy and local RAM backing, dirty tracking, and the
host side of the guest agent channel.
Below it: ``sporevm.vmm`` (the KVM backend) and the spore format
(``sporevm.spore``); above it: ``build`` and the CLI (tests/test_layering.py).
"""
