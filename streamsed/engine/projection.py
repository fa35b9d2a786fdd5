"""The decoder's vocabulary projection (hidden states -> logits), with kernels chosen for a CPU.

Whisper's output matrix is 51865 x 512 floats (106 MB), so every decoder step reads 106 MB, and
torch's ``linear`` reads it slowly for the few rows a decoder step has. Measured on this project's
2-core AMD EPYC machine (torch 2.13 CPU, 2026-12-07, median ms of 21, the matrix product alone):

| rows | linear, 1 / 2 threads | x @ W^T stored transposed | W @ x^T, chunks of <= 8 rows |
|--:|--:|--:|--:|
| 1 | 10.7 / 10.0 | 4.6 / 4.7 | - |
| 2 | 21.5 / 21.5 | 8.6 / 8.6 | 5.3 / 5.3 |
| 8 | 20.7 / 17.6 | 19.0 / 15.5 | 14.8 / 12.4 |
| 10 | 22.1 / 23.4 | 20.2 / 19.2 | 20.0 / 14.1 |
| 12 | 23.5 / 17.4 | 21.2 / 16.3 | 25.2 / 18.2 |
| 16 | 26.3 / 18.8 | 25.1 / 18.1 | 29.9 / 13.9 |
| 24 | 32.4 / 25.0 | 30.7 / 24.0 | 43.0 / 23.6 |

So: one row (a plain decoder step) and many rows run as ``x @ W^T`` on a transposed copy of the
matrix, kept once per weight tensor and shared by the lanes (+106 MB for whisper-base); 2 to
``few_rows()`` rows (draft verification, small lockstep batches) as ``W @ x^T`` in balanced chunks.
Each kernel sums in its own order, so logits differ from ``linear``'s (and a plain step's from
``generate()``'s) in the last float32 bits, ~1e-6: only a near-tie that close could change a greedy
token. The parity tests (tiny models, whisper-base clips, ``bench decode``'s segments, which check
every token) find ``generate()``'s tokens everywhere.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: like families.py, this module imports without torch
    import torch

__all__ = ["project", "few_rows", "CHUNK_ROWS"]

CHUNK_ROWS = 8  # most rows one W @ x^T takes; more are split into balanced chunks


def few_rows() -> int:
    """Most rows ``W @ x^T`` wins for, with this thread's torch thread count (lanes run one)."""
    import torch

    return 16 if torch.get_num_threads() >= 2 else 10


def project(linear, hidden: torch.Tensor) -> torch.Tensor:
    """``linear(hidden)`` for the vocabulary projection, hidden [batch, positions, width]."""
    import torch

    if (type(linear) is not torch.nn.Linear or hidden.device.type != "cpu" or hidden.dtype != linear.weight.dtype
            or torch.compiler.is_compiling()):  # CUDA, int8 layers, traced graphs: torch's own linear
        return linear(hidden)
    batch, positions, width = hidden.shape
    rows = batch * positions
    flat = hidden.reshape(rows, width)
    if 2 <= rows <= few_rows():
        size = math.ceil(rows / math.ceil(rows / CHUNK_ROWS))  # 9 rows: 5 + 4, never a lone row (a slow GEMV)
        out = torch.cat([torch.mm(linear.weight, chunk.t()).t() for chunk in flat.split(size)])
    else:
        out = torch.mm(flat, _transposed(linear.weight))
    if linear.bias is not None:
        out = out + linear.bias
    return out.reshape(batch, positions, -1)


_copies: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}  # id(weight) -> (weight, its state, W^T)
_copies_lock = threading.Lock()


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    """A contiguous W^T, made once per weight tensor (lanes share it) and remade when the weight
    changed: in place (an optimizer step, load_state_dict) or given new data (``module.to``).
    Writes through ``weight.data`` that keep its storage are invisible to torch and to this cache;
    nothing in streamsed changes a loaded model that way. Dropped with the weight."""
    key = id(weight)
    state = (_version(weight), weight.data_ptr(), weight.dtype, tuple(weight.shape))

    def cached():
        entry = _copies.get(key)
        return entry[2] if entry is not None and entry[0]() is weight and entry[1] == state else None

    copy = cached()
    if copy is None:
        with _copies_lock:  # two lanes missing at once: one builds the copy, the other takes it
            copy = cached()
            if copy is None:
                copy = weight.detach().t().contiguous()
                _copies[key] = (weakref.ref(weight, lambda _, key=key: _copies.pop(key, None)), state, copy)
    return copy


def _version(tensor: torch.Tensor) -> int:
    """torch's count of in-place changes (inference tensors have none: they never change)."""
    try:
        return tensor._version
    except RuntimeError:
        return 0
