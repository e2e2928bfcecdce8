"""A researcher's own encoders: tiny random models of each family, built here (no hub), through
``hf:`` and ``timm:``, and a cache that is reused when nothing read from disk has changed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, make_pairs
from typer.testing import CliRunner

from featcache.cache.errors import FeatcacheError
from featcache.cache.store import FeatureStore
from featcache.cli.main import app
from featcache.pipeline.extract.loading import load_encoder
from featcache.pipeline.extract.run import ExtractConfig, extract

runner = CliRunner()
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def save_word_tokenizer(path: Path, max_length: int = 32, **special) -> None:
    """A word-level fast tokenizer: what any family's text tower can load from tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", "<mask>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>", model_max_length=max_length, **special).save_pretrained(path)


def save_text_model(path: Path, family: str, drop: str | None = None) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    n_vocab = 5 + len(WORDS)
    config, model = {
        "bert": (tf.BertConfig, tf.BertModel),
        "roberta": (tf.RobertaConfig, tf.RobertaModel),
        "xlm-roberta": (tf.XLMRobertaConfig, tf.XLMRobertaModel),
        "mpnet": (tf.MPNetConfig, tf.MPNetModel),
        "clip-text": (tf.CLIPTextConfig, tf.CLIPTextModel),
    }[family]
    extra = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    m = model(config(vocab_size=n_vocab, max_position_embeddings=40, **SMALL, **extra))
    state = {k: v for k, v in m.state_dict().items() if not (drop and k.startswith(drop))}
    m.save_pretrained(path, state_dict=state)
    save_word_tokenizer(path)
    return path


def save_vision_model(path: Path, family: str, processor: dict | None = None) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    config, model = {
        "vit": (tf.ViTConfig, tf.ViTModel),
        "clip-vision": (tf.CLIPVisionConfig, tf.CLIPVisionModel),
        "siglip-vision": (tf.SiglipVisionConfig, tf.SiglipVisionModel),
    }[family]
    model(config(image_size=32, patch_size=8, **SMALL)).save_pretrained(path)
    if processor is not None:
        (path / "preprocessor_config.json").write_text(json.dumps(processor))
    return path


def cli_extract(model: Path, pairs: Path, cache: Path, *more: str, input: str | None = None):
    out = runner.invoke(app, ["extract", "--model", f"hf:{model}", "--dataset", str(pairs), "--cache-dir", str(cache),
                              "--batch-size", "8", "--split", "train", *more], input=input)
    return out


def test_a_checkpoint_without_its_pooler_reuses_its_cache(tmp_path):
    model = save_text_model(tmp_path / "bert", "bert", drop="pooler.")
    pairs = make_pairs(tmp_path / "data", n=12)
    first = cli_extract(model, pairs, tmp_path / "cache")
    assert first.exit_code == 0, first.output
    assert "2 parameters are not in the checkpoint" in first.output and "pooler.dense" in first.output
    second = cli_extract(model, pairs, tmp_path / "cache")
    assert second.exit_code == 0, second.output
    assert "cached" in second.output and "different identity" not in second.output
    digests = {load_encoder(f"hf:{model}", "cpu").weights_digest for _ in range(2)}
    assert len(digests) == 1


def test_missing_parameters_that_the_layers_use_are_refused(tmp_path):
    model = save_text_model(tmp_path / "bert", "bert", drop="encoder.layer.1.output")
    pairs = make_pairs(tmp_path / "data", n=6)
    out = cli_extract(model, pairs, tmp_path / "cache")
    assert out.exit_code == 2 and "lacks 4 parameters that the requested layers use" in out.output, out.output
    assert "encoder.layer.1.output" in out.output
    # the layers before them are still extractable
    ok = cli_extract(model, pairs, tmp_path / "cache", "--layers", "embed,block.00")
    assert ok.exit_code == 0, ok.output


def test_a_changed_weight_file_is_another_identity(tmp_path):
    from safetensors.torch import load_file, save_file

    model = save_text_model(tmp_path / "bert", "bert")
    pairs = make_pairs(tmp_path / "data", n=6)
    assert cli_extract(model, pairs, tmp_path / "cache").exit_code == 0
    weights = load_file(model / "model.safetensors")
    key = next(k for k in weights if k.endswith("attention.self.query.weight"))
    weights[key] = weights[key] + 1e-3
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    out = cli_extract(model, pairs, tmp_path / "cache")
    assert out.exit_code == 2 and "different identity" in out.output and "weights_sha256" in out.output


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "mpnet", "clip-text"])
def test_text_families_extract_every_layer(tmp_path, family):
    model = save_text_model(tmp_path / family, family)
    pairs = make_pairs(tmp_path / "data", n=6)
    out = cli_extract(model, pairs, tmp_path / "cache", "--layers", "all")
    assert out.exit_code == 0, out.output
    enc = load_encoder(f"hf:{model}", "cpu")
    store = FeatureStore.open(next((tmp_path / "cache").rglob("*.zarr")))
    assert store.layers == ["embed", "block.00", "block.01"]  # "all": the embedding and every block
    if enc.has_final:
        assert cli_extract(model, pairs, tmp_path / "cache", "--layers", "final").exit_code == 0
        store = FeatureStore.open(store.path)
    assert ("final" in enc.layer_names) == (family == "clip-text")  # CLIP's final_layer_norm; BERTs have none
    # the stored layers are the model's own hidden states, mean-pooled over the real tokens
    texts = store.texts
    inputs = enc.prepare_texts(texts)
    with torch.no_grad():
        out = enc.model(**inputs, output_hidden_states=True)
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    for i, name in enumerate(["embed", "block.00", "block.01"]):
        want = (out.hidden_states[i] * mask).sum(1) / mask.sum(1)
        np.testing.assert_allclose(store.read(name), want.numpy(), rtol=2e-3, atol=2e-3)
    if family == "clip-text":
        want = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
        np.testing.assert_allclose(store.read("final"), want.numpy(), rtol=2e-3, atol=2e-3)


def test_vit_preprocessing_comes_from_its_processor(tmp_path):
    processor = {"do_resize": True, "size": {"height": 64, "width": 64}, "resample": 2, "do_normalize": True,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "ViTImageProcessor"}
    model = save_vision_model(tmp_path / "vit", "vit", processor)
    pairs = make_pairs(tmp_path / "data", n=6)
    out = cli_extract(model, pairs, tmp_path / "cache", "--layers", "all")
    assert out.exit_code == 0, out.output
    store = FeatureStore.open(next((tmp_path / "cache").rglob("*.zarr")))
    prep = store.identity["encoder"]["preprocessing"]
    assert prep["image_size"] == 64 and prep["processor"].startswith("ViTImageProcessor")
    assert prep["processor_settings"]["image_mean"] == [0.5] * 3
    assert store.path.name == "cls-64px.zarr"
    assert store.layers == ["embed", "block.00", "block.01"]
    assert cli_extract(model, pairs, tmp_path / "cache", "--layers", "final").exit_code == 0
    store = FeatureStore.open(store.path)
    # the stored CLS features are the model's own at 64 px (position embeddings interpolated)
    from transformers import ViTImageProcessor, ViTModel

    from featcache.pipeline.data.catalog import load_dataset

    images = load_dataset(str(pairs))["train"].images
    pil = [images.load(i) for i in range(len(images))]
    pixels = ViTImageProcessor.from_pretrained(model)(pil, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = ViTModel.from_pretrained(model)(pixel_values=pixels, output_hidden_states=True,
                                              interpolate_pos_encoding=True)
    np.testing.assert_allclose(store.read("block.01"), ref.hidden_states[2][:, 0].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(store.read("final"), ref.last_hidden_state[:, 0].numpy(), rtol=2e-3, atol=2e-3)
    # --image-size overrides the processor and is what the store records
    again = cli_extract(model, pairs, tmp_path / "cache", "--image-size", "48")
    assert again.exit_code == 0, again.output
    assert any(p.name == "cls-48px.zarr" for p in (tmp_path / "cache").rglob("*.zarr"))


@pytest.mark.parametrize("family", ["clip-vision", "siglip-vision"])
def test_clip_and_siglip_vision_towers(tmp_path, family):
    processor = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 40},
                 "crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "resample": 3,
                 "image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28]}
    if family == "siglip-vision":
        processor = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 32, "width": 32},
                     "resample": 3, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    model = save_vision_model(tmp_path / family, family, processor)
    pairs = make_pairs(tmp_path / "data", n=6)
    out = cli_extract(model, pairs, tmp_path / "cache", "--layers", "all")
    assert out.exit_code == 0, out.output
    store = FeatureStore.open(next((tmp_path / "cache").rglob("*.zarr")))
    prep = store.identity["encoder"]["preprocessing"]
    assert prep["image_size"] == 32 and prep["processor"].startswith(processor["image_processor_type"])
    enc = load_encoder(f"hf:{model}", "cpu")
    # the model's own processor makes the pixels, whatever its class (CLIP: shorter side 40, crop 32)
    from transformers import AutoImageProcessor

    from featcache.pipeline.data.catalog import load_dataset as _load

    pil = [_load(str(pairs))["train"].images.load(i) for i in range(3)]
    theirs = AutoImageProcessor.from_pretrained(model, backend="pil")(images=pil, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(enc.prepare_images(pil), theirs)
    assert store.layers == ["embed", "block.00", "block.01"]
    # CLIP's post_layernorm normalises the pooled token only: it is not a layer of every token
    assert enc.has_final == (family == "siglip-vision")
    assert store.identity["encoder"]["pooling"] == ("cls" if family == "clip-vision" else "mean")
    from featcache.pipeline.data.catalog import load_dataset

    images = load_dataset(str(pairs))["train"].images
    x = enc.prepare_images([images.load(i) for i in range(len(images))])
    with torch.no_grad():
        hidden = enc.model(pixel_values=x, output_hidden_states=True).hidden_states
    pool = (lambda h: h[:, 0]) if family == "clip-vision" else (lambda h: h.mean(1))
    for i, name in enumerate(["embed", "block.00", "block.01"]):
        np.testing.assert_allclose(store.read(name), pool(hidden[i]).numpy(), rtol=2e-3, atol=2e-3)
    if family == "siglip-vision":
        bad = cli_extract(model, pairs, tmp_path / "cache", "--pooling", "cls")
        assert bad.exit_code == 2 and "pooling 'cls' is not available" in bad.output


def test_a_model_without_hidden_states_is_one_line(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], image_size=32)).save_pretrained(
        tmp_path / "resnet")
    out = cli_extract(tmp_path / "resnet", make_pairs(tmp_path / "data", n=4), tmp_path / "cache")
    assert out.exit_code == 2 and "ResNetModel gives no hidden states" in out.output, out.output


def test_remote_code_is_never_run(tmp_path):
    model = save_text_model(tmp_path / "bert", "bert")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    out = cli_extract(model, make_pairs(tmp_path / "data", n=4), tmp_path / "cache", input="y\ny\n")
    assert out.exit_code == 2 and not marker.exists(), out.output
    assert "never runs" in " ".join(out.output.split())


def test_a_text_model_without_a_tokenizer_is_refused(tmp_path):
    model = save_text_model(tmp_path / "bert", "bert")
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    out = cli_extract(model, make_pairs(tmp_path / "data", n=4), tmp_path / "cache")
    assert out.exit_code == 2 and "holds no tokenizer" in out.output, out.output


# -- timm ------------------------------------------------------------------------------------
def test_timm_without_pretrained_weights_is_the_same_model_every_time(tmp_path):
    spec = "timm:vit_tiny_patch16_224:pretrained=False"
    a, b = (load_encoder(spec, "cpu", image_size=32) for _ in range(2))
    assert a.weights_digest == b.weights_digest
    pairs = make_pairs(tmp_path / "data", n=6)
    for _ in range(2):
        res = extract(ExtractConfig(model=spec, dataset=str(pairs), cache_dir=tmp_path / "cache", image_size=32,
                                    splits=["train"], layers="last"))
    assert res[0].computed_rows == 0


def test_timm_local_checkpoint_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    save_file(model.state_dict(), tmp_path / "mine.safetensors")
    enc = load_encoder(f"timm:vit_tiny_patch16_224:checkpoint={tmp_path / 'mine.safetensors'}", "cpu", image_size=32)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(enc.model.state_dict()[name], value)
    with pytest.raises(FeatcacheError, match="does not exist"):
        load_encoder("timm:vit_tiny_patch16_224:checkpoint=/nonexistent.pth", "cpu")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FeatcacheError, match="cannot load the checkpoint file"):
        load_encoder(f"timm:vit_tiny_patch16_224:checkpoint={tmp_path / 'junk.pth'}", "cpu")


def test_timm_hub_name_without_network_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = runner.invoke(app, ["extract", "--model", "timm:vit_tiny_patch16_224", "--dataset",
                              str(make_pairs(tmp_path / "data", n=4)), "--cache-dir", str(tmp_path / "cache")])
    assert out.exit_code == 2 and "could not be fetched" in out.output, out.output
    assert "Traceback" not in out.output


def test_a_two_tower_model_says_how_to_split_it(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    vision = dict(image_size=32, patch_size=8, **SMALL)
    text = dict(vocab_size=30, max_position_embeddings=16, **SMALL)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(tmp_path / "clip")
    out = cli_extract(tmp_path / "clip", make_pairs(tmp_path / "data", n=4), tmp_path / "cache")
    assert out.exit_code == 2, out.output
    text = " ".join(out.output.split())
    assert "holds an image and a text tower (CLIPModel)" in text and "CLIPVisionModel.from_pretrained" in text


@pytest.mark.parametrize("processor", [
    {"image_processor_type": "ViTImageProcessor", "size": 32, "resample": 2},  # an int size: a square resize
    {"image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32}, "do_normalize": False},
    {"image_processor_type": "BeitImageProcessor", "size": {"height": 40, "width": 40}, "do_center_crop": True,
     "crop_size": {"height": 32, "width": 32}},
])
def test_the_processor_is_followed_as_transformers_does(tmp_path, processor):
    from transformers import AutoImageProcessor

    from featcache.pipeline.data.catalog import load_dataset

    model = save_vision_model(tmp_path / "vit", "vit", processor)
    pil = [load_dataset(str(make_pairs(tmp_path / "data", n=6)))["train"].images.load(i) for i in range(3)]
    theirs = AutoImageProcessor.from_pretrained(model, backend="pil")(images=pil, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(load_encoder(f"hf:{model}", "cpu").prepare_images(pil), theirs)


@pytest.mark.parametrize("processor, needle", [
    ({"image_processor_type": "ViTImageProcessor", "size": 32, "image_std": [0, 0, 0]}, "non-finite pixels"),
    ({"image_processor_type": "ViTImageProcessor", "size": 32, "image_mean": [0.5, 0.5, 0.5, 0.5]}, "fails on an image"),
    ({"image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 64}}, "32 x 64"),
])
def test_a_processor_that_cannot_work_is_one_line(tmp_path, processor, needle):
    model = save_vision_model(tmp_path / "vit", "vit", processor)
    out = cli_extract(model, make_pairs(tmp_path / "data", n=4), tmp_path / "cache")
    assert out.exit_code == 2 and needle in " ".join(out.output.split()), out.output
    assert "Traceback" not in out.output


@pytest.mark.parametrize("edit", ["config", "tokenizer"])
def test_an_edited_config_or_tokenizer_is_another_identity(tmp_path, edit):
    model = save_text_model(tmp_path / "bert", "bert")
    pairs = make_pairs(tmp_path / "data", n=6)
    assert cli_extract(model, pairs, tmp_path / "cache").exit_code == 0
    if edit == "config":
        config = json.loads((model / "config.json").read_text())
        config["hidden_act"] = "relu"
        (model / "config.json").write_text(json.dumps(config))
    else:
        tok = json.loads((model / "tokenizer.json").read_text())
        vocab = tok["model"]["vocab"]
        vocab["red"], vocab["blue"] = vocab["blue"], vocab["red"]
        (model / "tokenizer.json").write_text(json.dumps(tok))
    out = cli_extract(model, pairs, tmp_path / "cache")
    assert out.exit_code == 2 and "different identity" in out.output and "files_sha256" in out.output, out.output


def test_damaged_weights_and_missing_folders_are_one_line(tmp_path):
    model = save_text_model(tmp_path / "bert", "bert")
    pairs = make_pairs(tmp_path / "data", n=4)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    out = cli_extract(model, pairs, tmp_path / "cache")
    assert out.exit_code == 2 and "weights cannot be loaded" in out.output and "Traceback" not in out.output
    out = runner.invoke(app, ["extract", "--model", f"hf:{tmp_path}/no-such-model", "--dataset", str(pairs),
                              "--cache-dir", str(tmp_path / "cache")])
    assert out.exit_code == 2 and "no model folder at" in out.output and "could not be fetched" not in out.output


def test_a_tokenizer_without_a_pad_token_pads_with_its_end_token(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = save_text_model(tmp_path / "bert", "bert")
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", "<mask>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(model)
    out = cli_extract(model, make_pairs(tmp_path / "data", n=6), tmp_path / "cache")
    assert out.exit_code == 0, out.output


def test_a_timm_cnn_is_refused_in_one_line(tmp_path):
    out = runner.invoke(app, ["extract", "--model", "timm:resnet18:pretrained=False", "--dataset",
                              str(make_pairs(tmp_path / "data", n=4)), "--cache-dir", str(tmp_path / "cache")])
    assert out.exit_code == 2 and "not a vision transformer" in out.output and "Traceback" not in out.output


@pytest.mark.parametrize("family, sizes", [("dinov2", [28]), ("vit", [16, 32]), ("clip-vision", [16, 32]),
                                           ("siglip-vision", [16, 32])])
def test_the_loading_probe_runs_two_by_two_patches_where_the_model_takes_them(tmp_path, family, sizes):
    """DINOv2 interpolates its positions: its probe is 2 x 2 patches, not its 518 px (about 6%
    of a 256-image CPU extraction went to two such probes). Towers that refuse another size are
    probed at their own, and their final norm is still found."""
    import transformers as tf

    from featcache.pipeline.extract.encoders import probe_forward

    if family == "dinov2":
        tf.Dinov2Model(tf.Dinov2Config(image_size=56, patch_size=14, **SMALL)).save_pretrained(tmp_path / "m")
        path = tmp_path / "m"
    else:
        path = save_vision_model(tmp_path / "m", family)
    model = tf.AutoModel.from_pretrained(path)
    seen = []
    model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["pixel_values"].shape[-1]), with_kwargs=True)
    probe_forward(model)
    assert seen == sizes
    enc = load_encoder(f"hf:{path}", "cpu")
    assert enc.has_final == (family != "clip-vision")  # CLIP's post_layernorm norms the pooled token only


def test_a_non_square_model_size_is_one_line_and_an_image_size_serves_it(tmp_path):
    """YOLOS records image_size as [h, w]: the probe used to fail on it (so no final norm was
    found) and loading raised a TypeError. Now: a one-line error naming --image-size, and with
    it the model extracts, its 2 x 2-patch probe run and its final norm found."""
    import transformers as tf

    from featcache.pipeline.extract.encoders import dummy_inputs

    model = tf.YolosModel(tf.YolosConfig(image_size=[32, 48], patch_size=8, num_detection_tokens=2, **SMALL))
    assert dummy_inputs(model)["pixel_values"].shape == (1, 3, 32, 48)
    model.save_pretrained(tmp_path / "yolos")
    pairs = make_pairs(tmp_path / "data", n=12)
    out = cli_extract(tmp_path / "yolos", pairs, tmp_path / "cache")
    assert out.exit_code != 0 and "[32, 48] is not square" in out.output and "--image-size" in out.output
    assert "Traceback" not in out.output and not list((tmp_path / "cache").rglob("*.zarr"))
    out = cli_extract(tmp_path / "yolos", pairs, tmp_path / "cache", "--image-size", "32")
    assert out.exit_code == 0, out.output
    enc = load_encoder(f"hf:{tmp_path / 'yolos'}", "cpu", 32)
    assert enc.has_final and enc.layer_names[-1] == "final"
