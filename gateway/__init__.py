"""XDS-I.b / XCA-I imaging gateway."""

__version__ = "0.1.0"
