"""synray: identity-labelled synthetic face datasets and face-recognition training on Ray."""

__version__ = "0.1.0"
