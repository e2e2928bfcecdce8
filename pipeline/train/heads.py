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
        return self.temperature_of(self.log_temperature)

    @staticmethod
    def temperature_of(log_temperature: torch.Tensor) -> torch.Tensor:
        """tau from its log; a learnable one is clamped as in CLIP (logit scale at most 100).
        Static so that batched cells (stacked parameters) use the same rule."""
        return log_temperature.exp().clamp_min(0.01)

    def forward(self, x_image: torch.Tensor, x_text: torch.Tensor):
        # Features stay in the cache's float16 until here: a batch is cast, never the whole table.
        return self.image_head(x_image.float()), self.text_head(x_text.float())


# -- the fixed maps of training-free methods (CSA, ASIF, Procrustes) ----------------------------
class AffineMap(nn.Module):
    """z = (x - mean) W, on unit rows when ``unit``: a fitted projection (CSA, Procrustes)."""

    def __init__(self, mean: torch.Tensor, weight: torch.Tensor, unit: bool | torch.Tensor = False):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("weight", weight.float())
        self.register_buffer("unit", torch.as_tensor(unit, dtype=torch.bool).reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(x.float(), dim=-1) if bool(self.unit) else x.float()
        return (x - self.mean) @ self.weight


class RelativeMap(nn.Module):
    """ASIF's relative representation: cosine similarity to each anchor, the top ``k`` kept and
    raised to ``power``; rows of the two modalities' anchors are the same training pairs."""

    def __init__(self, anchors: torch.Tensor, k: torch.Tensor, power: torch.Tensor):
        super().__init__()
        self.register_buffer("anchors", nn.functional.normalize(anchors.float(), dim=-1))
        self.register_buffer("k", torch.as_tensor(k).long().reshape(()))
        self.register_buffer("power", torch.as_tensor(power).float().reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sims = nn.functional.normalize(x.float(), dim=-1) @ self.anchors.T
        top = sims.topk(int(self.k), dim=-1)
        kept = torch.zeros_like(sims).scatter_(-1, top.indices, top.values.clamp_min(0) ** self.power)
        return kept


class FixedModel(nn.Module):
    """The two maps of a training-free method, shaped like AlignmentModel for evaluation."""

    def __init__(self, image_head: nn.Module, text_head: nn.Module, temperature: float):
        super().__init__()
        self.image_head, self.text_head = image_head, text_head
        self.register_buffer("log_temperature", torch.tensor(float(temperature)).log())

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def forward(self, x_image: torch.Tensor, x_text: torch.Tensor):
        return self.image_head(x_image), self.text_head(x_text)


def fixed_model_from_state(state: dict, temperature: float) -> FixedModel:
    """Rebuild a training-free run's maps from its safetensors state (the shapes say which)."""
    def side(prefix: str) -> nn.Module:
        if f"{prefix}.anchors" in state:
            return RelativeMap(state[f"{prefix}.anchors"], state[f"{prefix}.k"], state[f"{prefix}.power"])
        return AffineMap(state[f"{prefix}.mean"], state[f"{prefix}.weight"], state[f"{prefix}.unit"])

    model = FixedModel(side("image_head"), side("text_head"), temperature)
    model.load_state_dict(state)
    return model
