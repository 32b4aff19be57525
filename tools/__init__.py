"""Measurement and fixtures, run from the repository root: python -m tools.bench, python -m
tools.phases, python -m tools.make_qwen3."""
