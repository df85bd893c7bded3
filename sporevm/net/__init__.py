"""Network clients shared by image fetches (``build``) and bundle transports (``dist``).

A bottom floor: it imports neither ``build`` nor ``dist``, so both can use it.
``deadline.py`` bounds every transfer in time; ``registry.py`` is the one OCI
registry client, with its host policy (``hosts.py``), auth inputs (``auth.py``)
and requests plumbing (``http.py``).
"""
