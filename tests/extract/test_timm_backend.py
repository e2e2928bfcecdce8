"""The timm backend's hooks agree with timm's own forward_intermediates(norm=False).

The hub is unreachable here, so the download inside timm.create_model is replaced by a tiny
randomly initialised ViT of the same class; the hooking and pooling code under test is real.
"""

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from featcache.pipeline.extract.loading import load_encoder


def test_timm_hooks_match_forward_intermediates(monkeypatch):
    torch.manual_seed(0)
    tiny = VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=3, num_heads=2,
                             dynamic_img_size=True, num_classes=0)
    tiny.pretrained_cfg = {"input_size": (3, 28, 28), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: tiny)
    enc = load_encoder("timm:vit_tiny_for_test", "cpu", image_size=28)
    assert enc.layer_names == ["embed", "block.00", "block.01", "block.02", "final"]
    x = torch.randn(3, 3, 28, 28)
    out = enc.forward(x, ["block.00", "block.02", "final"], "cls+mean")
    with torch.no_grad():
        inter = tiny.forward_intermediates(x, indices=[0, 2], norm=False, output_fmt="NLC",
                                           return_prefix_tokens=True, intermediates_only=True)
        final = tiny.forward_features(x)
    for name, (spatial, prefix) in zip(["block.00", "block.02"], inter):
        want = torch.cat([prefix[:, 0], spatial.mean(1)], -1)
        torch.testing.assert_close(out[name], want)
    torch.testing.assert_close(out["final"], torch.cat([final[:, 0], final[:, 1:].mean(1)], -1))
    assert enc.pooled_width("cls+mean") == 64
    assert enc.preprocessing["mean"] == [0.5, 0.5, 0.5]  # taken from the model's pretrained config
