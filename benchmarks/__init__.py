"""Aiki's benchmarks (issue 6): ``python -m benchmarks [suite ...] [--quick] [--reps N]``.

Each suite lives in its own module and exposes ``SUITE`` (see ``benchmarks/suite.py``).
"""
