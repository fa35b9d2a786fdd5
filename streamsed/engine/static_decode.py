"""Whisper's greedy loop on a static KV cache, with the decoder step captured in CUDA graphs.

On CUDA, most of a decoder step of a small model is kernel-launch overhead. A static cache
(``transformers.StaticCache``: K/V preallocated to the longest sequence, written in place) gives
every step the same shapes and addresses, so ``torch.compile(mode="reduce-overhead")`` can record
the step once per batch size as a CUDA graph and replay it.

What changes against the dynamic loop in ``engine._Loop.run``:

* rows are padded to a power of two (copies of the first row), so a few graphs cover every batch;
* finished rows are not pruned: they keep stepping and their tokens are ignored (pruning would
  change the shapes);
* the self-attention cache always has ``max_target_positions`` slots, masked past each position.

The tokens are the same as the dynamic loop's: ``tests/test_static_decode.py`` checks them on CPU
(eager, and traced by dynamo) against the dynamic loop and ``generate()``. When compiling fails
(no Triton, an unsupported op) the step falls back to eager, once, with a warning.
"""

from __future__ import annotations

import logging

import torch
from transformers import EncoderDecoderCache, StaticCache

log = logging.getLogger(__name__)

__all__ = ["StaticDecoder", "bucket_size"]


def bucket_size(rows: int) -> int:
    """The padded batch size for ``rows``: the next power of two."""
    return 1 << max(rows - 1, 0).bit_length()


class StaticDecoder:
    """Runs ``_Loop.run``'s job for Whisper on static caches; one cache per (batch, frames) shape."""

    def __init__(self, engine, compile_mode: str | None = "reduce-overhead", backend: str = "inductor"):
        self.family = engine.family
        self.config = engine.model.config
        self.max_length = self.family.max_target_positions
        self._caches: dict[tuple[int, int], EncoderDecoderCache] = {}
        self.compiled = compile_mode is not None or backend != "inductor"
        self._step = torch.compile(self._eager_step, mode=compile_mode, backend=backend, dynamic=False) \
            if self.compiled else self._eager_step

    def _eager_step(self, input_ids, states, cache):
        return self.family.step(input_ids, states, None, cache)

    def step(self, input_ids, states, cache) -> torch.Tensor:
        """One [batch, 1] step; the compiled one when it works, else eager from then on."""
        if self.compiled:
            try:
                return self._step(input_ids, states, cache).clone()  # the graph reuses its output buffer
            except Exception as error:  # noqa: BLE001 - any compiler failure: eager is always correct
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                log.warning("compiled decoder step failed (%s); decoding eagerly from now on", reason)
                self._step, self.compiled = self._eager_step, False
        return self._eager_step(input_ids, states, cache)

    def cache_for(self, batch: int, frames: int) -> EncoderDecoderCache:
        """A reset static cache for this shape, reused across decodes so graph addresses stay put."""
        cache = self._caches.get((batch, frames))
        if cache is None:
            cache = EncoderDecoderCache(StaticCache(self.config, max_cache_len=self.max_length),
                                        StaticCache(self.config, max_cache_len=frames))
            self._caches[(batch, frames)] = cache
        else:
            cache.reset()
        for layer in cache.is_updated:
            cache.is_updated[layer] = False
        return cache

    def run(self, loop, states, sequences, step_input, cache, live: list[int], results, steps: int) -> None:
        """Decode up to ``steps`` tokens for rows ``live``; ``cache`` is the dynamic cache so far
        (empty, or a verified draft prefix) and is copied into the static one."""
        rows = len(live)
        batch = bucket_size(rows)
        if batch > rows:  # pad with copies of row 0; their tokens are never read
            extra = batch - rows
            states = torch.cat([states, states[:1].expand(extra, -1, -1)])
            sequences = torch.cat([sequences, sequences[:1].expand(extra, -1)])
            step_input = torch.cat([step_input, step_input[:1].expand(extra, -1)])
        static = self.cache_for(batch, states.shape[1])
        if cache.get_seq_length() > 0:
            self._copy_prefix(cache, static, batch)
        done = torch.zeros(batch, dtype=torch.bool, device=states.device)
        done[rows:] = True
        for _ in range(steps):
            loop.check_stop()
            if step_input.shape[1] > 1:  # the prompt fills the cache in one eager forward (not graphed)
                logits = loop.prompt_logits(step_input, states, None, static, live, results)
            else:
                logits = self.step(step_input, states, static)
            loop.stats.steps += 1
            loop.stats.batch_sizes.append(rows)
            scores = loop.processors(sequences, logits.float())
            next_tokens = scores.argmax(dim=-1)
            open_rows = (~done).nonzero().squeeze(-1)
            loop.add_logprobs(scores.index_select(0, open_rows), next_tokens.index_select(0, open_rows),
                              [live[i] for i in open_rows.tolist()], results)
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
            finished = torch.isin(next_tokens, loop.eos)
            for i, (token, was_done, ends) in enumerate(zip(next_tokens.tolist(), done.tolist(), finished.tolist())):
                if not was_done and not ends:
                    results[live[i]].tokens.append(token)
            done |= finished
            if bool(done.all()):
                return
            step_input = next_tokens[:, None]
        for i, row in enumerate(live):  # still going when the length limit struck
            if not done[i]:
                results[row].finished = False

    def _copy_prefix(self, dynamic: EncoderDecoderCache, static: EncoderDecoderCache, batch: int) -> None:
        """Write a dynamic cache's K/V (padded to ``batch`` rows) into the static cache's slots."""
        pairs = ((dynamic.self_attention_cache, static.self_attention_cache),
                 (dynamic.cross_attention_cache, static.cross_attention_cache))
        for source, target in pairs:
            for own, layer in zip(source.layers, target.layers):
                keys, values = _pad_rows(own.keys, batch), _pad_rows(own.values, batch)
                if not layer.is_initialized:
                    layer.lazy_initialization(keys, values)
                layer.keys[:, :, : keys.shape[2]].copy_(keys)
                layer.values[:, :, : values.shape[2]].copy_(values)
                layer.cumulative_length.fill_(keys.shape[2])
        for index in static.is_updated:
            static.is_updated[index] = True


def _pad_rows(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    extra = batch - tensor.shape[0]
    return torch.cat([tensor, tensor[:1].expand(extra, *tensor.shape[1:])]) if extra > 0 else tensor
