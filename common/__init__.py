"""Shared pieces of cxr-features: everything two jobs use, and nothing that starts Spark."""

__version__ = "0.1.0"
