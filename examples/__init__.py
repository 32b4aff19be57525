"""Whole scripts that use the project from other libraries, run as python -m examples.<name>."""
