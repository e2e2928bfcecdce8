"""Stage one with the real offline weights on real Tux Paint rows."""

import numpy as np
import pytest
import torch
from conftest import requires_real

from featcache.cache.store import FeatureStore
from featcache.pipeline.data.catalog import load_dataset
from featcache.pipeline.extract.loading import load_encoder
from featcache.pipeline.extract.run import ExtractConfig, extract

pytestmark = pytest.mark.real  # deselect with -m 'not real'


@requires_real
def test_dinov2_and_minilm_store_equals_direct_forward(tmp_path):
    for model, n_layers in (("dinov2", 13), ("minilm", 7)):
        res = extract(ExtractConfig(model=model, dataset="tuxpaint", splits=["test"], limit=6,
                                    cache_dir=tmp_path, batch_size=3))[0]
        store = FeatureStore.open(res.path)
        assert len(store.layers) == n_layers and store.width == 384 and store.is_complete()
        enc = load_encoder(model, "cpu")
        split = load_dataset("tuxpaint")["test"].limited(6)
        with torch.no_grad():
            if model == "dinov2":
                assert store.identity["encoder"]["preprocessing"]["image_size"] == 224
                x = enc.prepare_images([split.images.load(i) for i in range(6)])
                hidden = enc.model(pixel_values=x, output_hidden_states=True).hidden_states
                refs = [h[:, 0] for h in hidden]
            else:
                tok = enc.prepare_texts(store.texts)
                hidden = enc.model(**tok, output_hidden_states=True).hidden_states
                m = tok["attention_mask"].unsqueeze(-1).float()
                refs = [(h * m).sum(1) / m.sum(1) for h in hidden]
        for name, ref in zip(store.layers, refs):
            ref = ref.numpy()
            # float16 storage: relative rounding of about 1e-3 of each value's magnitude
            np.testing.assert_allclose(store.read(name), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


@requires_real
def test_tuxpaint_splits_are_disjoint_and_stable():
    a, b = load_dataset("tuxpaint"), load_dataset("tuxpaint")
    ids = {k: set(v.images.ids) for k, v in a.items()}
    assert not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"]) and not (ids["train"] & ids["val"])
    assert all(a[k].images.ids == b[k].images.ids for k in a)
    assert not any(i.startswith("symbols/alphabets") for s in ids.values() for i in s)
    n = sum(len(s) for s in ids.values())
    assert 0.15 < len(ids["test"]) / n < 0.25
    salted = load_dataset("tuxpaint:salt=1")
    assert set(salted["test"].images.ids) != ids["test"]
