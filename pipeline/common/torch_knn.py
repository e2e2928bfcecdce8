"""Exact inner-product search with torch: the GPU search where faiss has no GPU build.

faiss-gpu cannot be installed everywhere (on a CUDA 13 machine without network its wheels need
libraries that are not there), but torch with CUDA usually is. A flat inner-product search is one
matrix product and a top-k; faiss's ``GpuIndexFlatIP`` runs the same cuBLAS GEMM. The products
run in float32 with TF32 off, because TF32 rounds the inputs to 10 mantissa bits, enough to
reorder close neighbours: this search must rank as faiss-cpu does, ties aside
(tests/common/test_torch_knn.py).

Memory is bounded by blocks: each (query block x gallery block) score matrix stays under
``SCORE_BYTES``, and only the running top k of each query is kept between gallery blocks.
:class:`TorchFlatIP` answers ``add``, ``search`` and ``ntotal`` as the faiss index does, so the
callers of ``featcache.pipeline.common.device.flat_ip`` do not know which one they hold.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

SCORE_BYTES = {"cuda": 1 << 30, "cpu": 1 << 27}  # the largest score block, per device type
GALLERY_BLOCK = 1 << 16  # rows of the gallery multiplied at once


@contextmanager
def full_float32():
    """float32 products as IEEE float32 (no TF32) for the length of a search, then as before."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def search_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TorchFlatIP:
    """An exact flat inner-product index held as one float32 tensor on ``device``."""

    def __init__(self, d: int, device: torch.device | None = None):
        self.d = d
        self.device = device or search_device()
        self._rows = torch.empty((0, d), dtype=torch.float32, device=self.device)

    @property
    def ntotal(self) -> int:
        return len(self._rows)

    def add(self, x: np.ndarray) -> None:
        rows = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        self._rows = rows if not self.ntotal else torch.cat([self._rows, rows])

    @torch.inference_mode()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, indices), each (m, k), best first; beyond ``ntotal`` the indices are -1 and the
        scores -inf (faiss pads the same way, with its lowest float)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        m, n = len(queries), self.ntotal
        scores = np.full((m, k), -np.inf, dtype=np.float32)
        found = np.full((m, k), -1, dtype=np.int64)
        kk = min(k, n)
        if not m or not kk:
            return scores, found
        gallery = min(n, GALLERY_BLOCK)
        block = max(1, SCORE_BYTES[self.device.type] // (4 * gallery))
        with full_float32():
            for s in range(0, m, block):
                q = torch.as_tensor(queries[s:s + block]).to(self.device)
                best_d = best_i = None
                for g in range(0, n, gallery):
                    d, i = torch.topk(q @ self._rows[g:g + gallery].T, min(kk, min(n, g + gallery) - g), dim=1)
                    i = i + g
                    if best_d is not None:
                        d, order = torch.topk(torch.cat([best_d, d], 1), kk, dim=1)
                        i = torch.gather(torch.cat([best_i, i], 1), 1, order)
                    best_d, best_i = d, i
                scores[s:s + block, :kk] = best_d.cpu().numpy()
                found[s:s + block, :kk] = best_i.cpu().numpy()
        return scores, found
