"""Aiki's deterministic simulation: a whole cluster in one ``trio.run``, under faults."""
