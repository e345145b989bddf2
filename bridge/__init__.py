"""termbridge: a shell in a brand-new, resource-limited container, from a browser or ssh."""

__version__ = "0.1.0"
