"""CUDA side streams for input work, and the hand-over of their tensors to the training stream.

Work queued on a side stream runs alongside the kernels of the step already queued on the
training (current) stream instead of after them. A tensor made there is handed over with
:func:`handed_over`: the training stream waits for the side stream, and the tensor is marked as
used by the training stream (``record_stream``), so the caching allocator gives its block to the
side stream again only once the training stream is past it. A side stream's own pool of blocks
only ever holds what that stream made, which is also why CUDA decoding uses a stream of its own
(see :mod:`pretrain.data.device_decode`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

Outputs = TypeVar("Outputs", bound=Sequence[torch.Tensor | None])


@functools.cache
def side_stream(device: torch.device, purpose: str) -> torch.cuda.Stream:
    """One stream per (CUDA device, purpose)."""
    return torch.cuda.Stream(device)


def handed_over(make: Callable[[], Outputs], device: torch.device, purpose: str) -> Outputs:
    """``make()`` run with ``side_stream(device, purpose)`` current; its tensors (``None``
    entries allowed) ready for use on the stream that was current before."""
    consumer = torch.cuda.current_stream(device)
    side = side_stream(device, purpose)
    with torch.cuda.stream(side):
        outputs = make()
    consumer.wait_stream(side)
    for tensor in outputs:
        if tensor is not None:
            tensor.record_stream(consumer)
    return outputs
