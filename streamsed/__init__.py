"""streamsed: streaming speech translation daemon.

The subpackages are layers; each may import only the layers below it (``lint-imports`` checks it):

- ``cli``      the ``streamsed`` command: translate, serve, mic, devices, bench
- ``bench``    benchmarks behind ``streamsed bench``
- ``daemon``   the asyncio edges: websocket/HTTP server, sessions, captions hub, MQTT, microphone, config
- ``engine``   the model and its device: families, loading, converters, the engine and its worker thread
- ``core``     sans-I/O: audio, VAD segmentation, stabilization, protocol messages, caption formats, languages

The Python API lives in ``streamsed.engine`` (``load_engine``, ``engine_from_model``, ``Engine``, ``Target``).
"""

__version__ = "0.1.0"
