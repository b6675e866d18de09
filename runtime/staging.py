"""HostStaging: persistent host buffers through which each step's host arrays reach the device.

Owned by the ModelRunner (CUDA only; on the CPU the runner uses numpy arrays in
place). A step's small int/float arrays (token ids, positions, slots, block
tables, sampling tables...) are packed into one host buffer, each array starting
16-byte aligned, and copied to the device with one non-blocking copy per
`stage()` call. The buffers are pinned once and reused: pinning a fresh buffer
every step (`pin_memory()`) costs a page-locking call per copy.

Reuse is safe across pipelined steps: the buffers form a ring of `num_slots`
slots, one per step; `end_step()` records a CUDA event after the step's copies
and `begin_step()` waits for the event of the slot it is about to overwrite
(normally long done). A slot that must grow keeps its old buffer alive until
that slot's next turn, since copies queued from it may still be pending.

Alignment: Triton specializes kernels on pointer alignment, so views at offsets
that follow each step's token and sequence counts would compile new kernel
variants mid-serving (a 1.1 s stall was measured on an H100 the first step where
B + 1 was a multiple of 4). Every staged array therefore starts 16-byte aligned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .utils import cdiv

ALIGN_BYTES = 16
_TORCH_DTYPES = {
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.float32): torch.float32,
}


def aligned_offsets(nbytes: list[int], align: int = ALIGN_BYTES) -> tuple[list[int], int]:
    """Byte offset of each array packed back to back, each `align`-aligned; and the total size."""
    offsets, total = [], 0
    for n in nbytes:
        offsets.append(total)
        total += cdiv(n, align) * align
    return offsets, total


@dataclass
class _Slot:
    buffer: torch.Tensor  # uint8 host buffer (pinned when staging to CUDA)
    used: int = 0  # bytes handed out in the current step
    done: torch.cuda.Event | None = None  # recorded after the slot's last step's copies
    retired: list[torch.Tensor] = field(default_factory=list)  # outgrown buffers with copies maybe pending


class HostStaging:
    def __init__(
        self, device: torch.device | str, *, pin: bool, num_slots: int = 3, initial_bytes: int = 1 << 20
    ):
        self.device = torch.device(device)
        self.pin = pin
        self._slots = [_Slot(self._alloc(initial_bytes)) for _ in range(num_slots)]
        self._i = 0

    def _alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def begin_step(self) -> None:
        """Move to the next slot, waiting until the copies of the step that last used it ran."""
        self._i = (self._i + 1) % len(self._slots)
        slot = self._slots[self._i]
        if slot.done is not None:
            slot.done.synchronize()
            slot.done = None
        slot.retired.clear()
        slot.used = 0

    def end_step(self) -> None:
        if self.device.type == "cuda":
            slot = self._slots[self._i]
            slot.done = torch.cuda.Event()
            slot.done.record()

    def stage(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Copy arrays (int32 / int64 / float32, any shape) to the device in one non-blocking copy;
        returns device tensors of the same dtypes and shapes, each 16-byte aligned."""
        slot = self._slots[self._i]
        arrays = [np.ascontiguousarray(a) for a in arrays]
        offsets, total = aligned_offsets([a.nbytes for a in arrays])
        base = cdiv(slot.used, ALIGN_BYTES) * ALIGN_BYTES
        if base + total > slot.buffer.numel():
            slot.retired.append(slot.buffer)
            slot.buffer = self._alloc(max(2 * slot.buffer.numel(), 2 * total))
            base = 0
        host = slot.buffer.numpy()
        for a, off in zip(arrays, offsets):
            host[base + off : base + off + a.nbytes].view(a.dtype)[:] = a.reshape(-1)
        slot.used = base + total
        dev = slot.buffer[base : base + total].to(self.device, non_blocking=True)
        out = []
        for a, off in zip(arrays, offsets):
            out.append(dev[off : off + a.nbytes].view(_TORCH_DTYPES[a.dtype]).view(a.shape))
        return out
