"""Shared library of the world-model pipeline: config, stores, video I/O, tracking, reports."""
