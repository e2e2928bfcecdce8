"""AlignedModel on new inputs equals the cached path: stored layer (float16) through the run's heads."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_model import train_tiny_run

import featcache
from featcache.cache.lookup import StoreQuery, open_store
from featcache.cache.naming import encoder_key
from featcache.pipeline.common.names import canonical_name
from featcache.pipeline.evaluate.run_view import embed
from featcache.pipeline.model import AlignedModel
from featcache.pipeline.train.runs import load_heads


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("aligned"))


def _store(cache, modality, split="test"):
    model = cache["vit"] if modality == "image" else cache["bert"]
    return open_store(cache["cache"], StoreQuery(canonical_name(str(cache["pairs"])), split, encoder_key(model)))


def test_public_name():
    assert featcache.AlignedModel is AlignedModel


def test_embeddings_equal_the_cached_rows_through_the_heads(tiny_run):
    cache, run = tiny_run
    model = AlignedModel.from_run(run, device="cpu")
    heads, cfg = load_heads(run)
    images, texts = _store(cache, "image"), _store(cache, "text")
    paths = [cache["pairs"].parent / i for i in images.ids]

    stored = images.read(cfg["image_layer"], dtype=np.float16)
    features, bad = model.image_features(paths)
    assert bad == [] and features.dtype == np.float16
    # the store's dtype, to its rounding: at most one float16 step apart (equal on one machine)
    assert np.allclose(features.astype(np.float32), stored.astype(np.float32), rtol=2 ** -10, atol=1e-6)
    cached = embed(heads.image_head, images.read(cfg["image_layer"]))
    got = model.encode_image(paths)
    np.testing.assert_allclose(got, cached, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)

    got_text = model.encode_text(texts.texts)
    np.testing.assert_allclose(got_text, embed(heads.text_head, texts.read(cfg["text_layer"])), atol=2e-3)
    assert np.allclose(model.text_features(texts.texts).astype(np.float32), texts.read(cfg["text_layer"]),
                       rtol=2 ** -10, atol=1e-6)


def test_pil_arrays_and_tensors_give_the_files_embeddings(tiny_run):
    cache, run = tiny_run
    model = AlignedModel.from_run(run, device="cpu", sides=("image",))
    paths = sorted(cache["pairs"].parent.glob("*.png"))[:4]
    by_path = model.encode_image(paths)
    pil = [Image.open(p) for p in paths]  # RGBA with transparency: composited on white like a file
    np.testing.assert_array_equal(model.encode_image(pil), by_path)
    rgb = [np.array(Image.open(p).convert("RGBA")) for p in paths]
    np.testing.assert_array_equal(model.encode_image(rgb), by_path)
    tensors = [torch.from_numpy(a).permute(2, 0, 1) for a in rgb]  # CHW uint8, as torchvision reads images
    out = model.encode_image(tensors, tensor=True)
    assert isinstance(out, torch.Tensor) and np.array_equal(out.numpy(), by_path)
    np.testing.assert_allclose(model.encode_image(paths[0]), by_path[:1], atol=1e-6)  # one image, one row (another batch)


def test_similarity_and_classify_use_the_same_space(tiny_run):
    cache, run = tiny_run
    model = AlignedModel.from_run(run, device="cpu")
    paths = sorted(cache["pairs"].parent.glob("*.png"))[:3]
    sims = model.similarity(paths, ["a red circle.", "a blue square."])
    assert sims.shape == (3, 2)
    result = model.classify(paths, ["red circle", "blue square"], templates=["a {}."])
    np.testing.assert_allclose(result.scores, sims, atol=1e-6)  # one template: its prompt's embedding
    top = result.top(1)
    assert [t[0][0] for t in top] == [["red circle", "blue square"][int(np.argmax(r))] for r in sims]


def test_batches_and_progress_do_not_change_the_result(tiny_run):
    cache, run = tiny_run
    paths = sorted(cache["pairs"].parent.glob("*.png"))[:9]
    a = AlignedModel.from_run(run, device="cpu", sides=("image",), batch_size=2).encode_image(paths)
    b = AlignedModel.from_run(run, device="cpu", sides=("image",), batch_size=32).encode_image(paths)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_model_without_a_side_says_so(tiny_run):
    _, run = tiny_run
    model = AlignedModel.from_run(run, device="cpu", sides=("text",))
    with pytest.raises(featcache.cache.errors.FeatcacheError, match="without its image encoder"):
        model.encode_image([Image.new("RGB", (28, 28))])
