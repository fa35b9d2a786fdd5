"""Benchmarks behind ``streamsed bench`` (method and results: ``bench/README.md`` at the repo root).

``decode``: the engine's decoder against ``generate()`` and CTranslate2 on the same weights.

May import the daemon, the engine and the core; the commands import it, not the other way round.
"""
