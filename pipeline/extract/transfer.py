"""A batch's pooled features on their way to the host: checked and cast on the device, then one
asynchronous copy.

Copying each layer with a blocking ``.cpu()`` made the thread that drives the GPU wait for the
GPU once per layer (25 times a batch for a ViT-L), and the float16 range check and the cast then
ran in numpy on that thread. Here the device does both for the stacked (layers, batch, width)
tensor and packs the result with the per-layer checks into one uint8 buffer, copied with
``non_blocking`` into pinned memory. A CUDA event marks the copy's end; whoever reads the batch
(the chunk writer, usually on its own thread) waits on that event, so the forward thread can
queue the next batch at once. Pinned buffers come from torch's caching host allocator, which
hands a block out again only once the copies that used it are done: it is the ring buffer.

On a CPU the same operations run in place, with no copy: torch's float32 to float16 cast rounds
to nearest even as numpy's does, and the maximum and finiteness tests are exact, so stores are
bitwise those of the numpy path (tests/extract/test_pipelined.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FP16_MAX = 65504.0


@dataclass
class HostBatch:
    """One batch's features in the stored dtype and its checks, once :meth:`wait` has returned."""

    values: torch.Tensor  # (layers, batch, width), the stored dtype
    checks: torch.Tensor  # (layers, 1 + batch) float32: each layer's max |x|, then 1.0 per finite row
    ready: object = None  # the CUDA event recorded after the copy; None on a CPU

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, checks) as numpy arrays; waits for the copy first."""
        self.wait()
        return self.values.numpy(), self.checks.numpy()


@torch.inference_mode()
def to_host(stacked: torch.Tensor, dtype: str) -> HostBatch:
    """Check, cast and start copying one stacked batch; returns without waiting on a GPU."""
    n_layers, batch, _ = stacked.shape
    checks = torch.cat([stacked.abs().amax(dim=(1, 2))[:, None],
                        torch.isfinite(stacked).all(dim=2).to(torch.float32)], dim=1)
    values = stacked.to(getattr(torch, dtype))
    if stacked.device.type != "cuda":
        return HostBatch(values.cpu(), checks.cpu())
    # checks first: their float32 bytes keep the values' offset aligned for float16 and float32
    packed = torch.cat([checks.reshape(-1).view(torch.uint8), values.reshape(-1).view(torch.uint8)])
    host = torch.empty(packed.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(packed, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    split = checks.numel() * 4
    return HostBatch(host[split:].view(values.dtype).view(values.shape),
                     host[:split].view(torch.float32).view(n_layers, 1 + batch), ready)


def first_problem(checks: np.ndarray, dtype: str) -> tuple[int, int | None] | None:
    """The first layer (in request order) whose rows are not finite (layer, the first bad row's
    index in the batch) or exceed float16 (layer, None); None when every layer is fine."""
    for layer, row in enumerate(checks):
        bad = np.flatnonzero(row[1:] == 0)
        if len(bad):
            return layer, int(bad[0])
        if dtype == "float16" and row[0] > FP16_MAX:
            return layer, None
    return None
