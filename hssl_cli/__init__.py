"""hssl: equivariant and homomorphic self-supervised learning on images."""

__version__ = "0.1.0"
