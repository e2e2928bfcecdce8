"""Every requested layer pooled inside the forward pass, by hooks registered once.

Registering and removing a hook per layer on every batch is host work on the thread that feeds
the device; at thousands of images a second it shows. So the hooks stay on the model between
batches, and do nothing outside a call of :meth:`PooledTaps.run`: a direct call of the model
(a test's reference forward, ``Encoder.check_initialised``) sees the plain model.

Tokens are pooled where they are, in the precision the model made them (bf16 under CUDA
autocast), with float32 accumulation: the mean reads the bf16 tokens once instead of first
copying every token to float32. On a CPU the tokens are float32 already, and these are the same
kernels as a plain ``.float().mean(1)``, so the pooled values are bitwise those of the earlier
per-batch hooks (tests/extract/test_pipelined.py).
"""

from __future__ import annotations

from typing import Callable

import torch


class Stop(Exception):
    """Raised from a hook once every requested layer is pooled, to skip the rest of the model."""


def stop(*_args) -> None:
    raise Stop


def register(tap, take: Callable) -> torch.utils.hooks.RemovableHandle:
    """A hook that hands ``take`` what the layer's tap sees: a module's input or its output."""
    if tap.kind == "input":
        return tap.module.register_forward_pre_hook(
            lambda _m, args, kwargs: take(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    return tap.module.register_forward_hook(lambda _m, _args, output: take(output))


def pool(tokens: torch.Tensor, pooling: str, modality: str, prefix: int, mask: torch.Tensor | None) -> torch.Tensor:
    """One layer's (batch, width) float32 features from its (batch, tokens, width) output."""
    if modality == "text":
        if pooling == "cls":
            return tokens[:, 0].float()
        return (tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # mask is float32: promotes bf16 tokens
    cls = tokens[:, 0].float()
    if pooling == "cls":
        return cls
    patches = tokens[:, prefix:].mean(1, dtype=torch.float32)
    return patches if pooling == "mean" else torch.cat([cls, patches], -1)


class PooledTaps:
    """Hooks on the taps of one list of layers, live only while :meth:`run` runs the model."""

    def __init__(self, taps: dict, layers: list[str]):
        self.layers = list(layers)
        self._wanted = set(self.layers)
        self._pool: Callable | None = None  # set for the length of one run
        self._pooled: dict[str, torch.Tensor] = {}
        self._handles = [register(taps[name], self._taker(name)) for name in self._wanted]

    def _taker(self, name: str) -> Callable:
        def take(tokens) -> None:
            if self._pool is None:
                return
            tokens = tokens[0] if isinstance(tokens, (tuple, list)) else tokens
            self._pooled[name] = self._pool(tokens)
            if self._wanted.issubset(self._pooled):
                raise Stop

        return take

    def run(self, call: Callable[[], object], pool_one: Callable) -> torch.Tensor:
        """(layers, batch, width) float32: ``call`` runs the model, ``pool_one`` pools a layer's tokens."""
        self._pool, self._pooled = pool_one, {}
        try:
            call()
        except Stop:
            pass
        finally:
            self._pool = None
        pooled, self._pooled = self._pooled, {}
        return torch.stack([pooled[n] for n in self.layers])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
