"""spore: build, seal and resume warm Linux microVM checkpoints."""

__version__ = "0.1.0"
