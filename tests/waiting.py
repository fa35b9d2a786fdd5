"""Waiting in async tests for state that other tasks change (slots freed, sessions opened)."""

import asyncio


async def eventually(condition, timeout=20.0, step=0.02):
    """Return once ``condition()`` is true; TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(step)
