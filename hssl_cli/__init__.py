"""hssl: equivariant and homomorphic self-supervised learning on images."""

from hssl_cli.version import __version__ as __version__


def __getattr__(name: str):
    """`hssl_cli.load_backbone(path)` and `hssl_cli.load_method(path)`, imported on first use (torch is heavy,
    and `import hssl_cli` must stay instant for the CLI)."""
    if name in ("load_backbone", "load_method"):
        from hssl_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'hssl_cli' has no attribute '{name}'")
