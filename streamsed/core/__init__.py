"""The sans-I/O core: plain classes and functions over bytes, arrays and dataclasses.

Audio decoding and resampling (``audio``), VAD segmentation (``vad``, ``segments``), stabilization of
partials (``stabilize``), protocol v1 messages (``protocol``), caption and result formats
(``captions``), languages and targets (``languages``) and user-facing errors (``errors``).

May import: the standard library, numpy, soundfile, soxr, webrtcvad. Nothing else of streamsed,
no sockets, no asyncio, no torch: everything here is tested without a model or a network.
"""
