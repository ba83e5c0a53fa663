"""The package version, read by the package and by the adapter config it writes."""

__version__ = "0.1.0"
