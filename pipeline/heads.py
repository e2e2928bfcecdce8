"""Alignment heads: a linear map, or the residual low-rank MLP of the method page."""

from __future__ import annotations

import torch
from torch import nn


class ResidualMLPHead(nn.Module):
    """z = P x + a * W2 GELU(W1 x), with W2 starting at zero.

    The released code starts its gate at sigmoid(-inf) = 0 with zero gradient, so its branch
    never trains. Here the gate ``a`` is a plain learnable scalar starting at a small positive
    value: W2 then receives gradient from the first step and the branch learns.
    """

    def __init__(self, d_in: int, d_out: int, rank: int = 64, gate_init: float = 0.1):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)
        self.w1 = nn.Linear(d_in, rank)
        self.w2 = nn.Linear(rank, d_out)
        nn.init.zeros_(self.w2.weight)
        nn.init.zeros_(self.w2.bias)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.gate * self.w2(nn.functional.gelu(self.w1(x)))


HEADS = {
    "linear": lambda d_in, d_out: nn.Linear(d_in, d_out),
    "mlp": lambda d_in, d_out: ResidualMLPHead(d_in, d_out),
}


def build_head(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind not in HEADS:
        from featcache.cache.errors import FeatcacheError

        raise FeatcacheError(f"unknown head {kind!r}", f"choose one of: {', '.join(HEADS)}")
    return HEADS[kind](d_in, d_out)


class AlignmentModel(nn.Module):
    """One head per modality, plus the (optionally learnable) temperature."""

    def __init__(self, head: str, d_image: int, d_text: int, d_out: int, temperature: float, learn_temperature: bool):
        super().__init__()
        self.image_head = build_head(head, d_image, d_out)
        self.text_head = build_head(head, d_text, d_out)
        log_t = torch.tensor(float(temperature)).log()
        self.log_temperature = nn.Parameter(log_t, requires_grad=learn_temperature)

    @property
    def temperature(self) -> torch.Tensor:
        # A learnable temperature is clamped as in CLIP (logit scale at most 100).
        return self.log_temperature.exp().clamp_min(0.01)

    def forward(self, x_image: torch.Tensor, x_text: torch.Tensor):
        return self.image_head(x_image), self.text_head(x_text)
