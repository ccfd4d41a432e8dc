"""dreaming: fluent-dreaming prompt synthesis for transcoder features (the library; no HTTP)."""

__version__ = "0.1.0"
