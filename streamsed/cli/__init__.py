"""The ``streamsed`` command: translate, serve, devices, mic and bench (``commands``), the terminal
microphone tool (``mic``).

May import every layer below it. Expected failures end in one ``streamsed: error: ...`` line and
exit status 2 (``streamsed.core.errors.UserError`` and the layers' own error types).
"""

from .commands import main

__all__ = ["main"]
