"""The daemon: thin asyncio edges around the engine worker.

``server`` (websockets + HTTP on one port, protocol v1, health), ``session`` (one live stream: VAD,
partials, finals), ``captions_hub`` (listener fan-out, finals for export), ``web_routes`` and
``web/`` (browser pages, caption export, Origin check), ``mqtt`` (MQTT and Home Assistant),
``microphone`` (capture and the daemon's mic source), ``config`` (TOML, environment, flags).

May import: ``streamsed.core``; ``streamsed.engine`` only inside functions or for type checking
(the server loads the model and starts the worker). Never torch or transformers: the event loop
never waits on the model, and ``lint-imports`` plus ``tests/test_layers.py`` keep it so.
"""
