"""hssl's version, in a module of its own: the checkpoint format records it without importing the package's
lazy top-level API (hssl_cli.load_backbone and load_method sit above the engine)."""

__version__ = "0.1.0"
