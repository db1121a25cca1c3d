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

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


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


def _hf_trainer(con, model, rows, batch: int, accumulate: int = 1, epochs: int = 1, callbacks=(), **kw):
    from transformers import TrainingArguments

    from metaql.integrations.huggingface import MetaQLTrainer

    class Spy(MetaQLTrainer):
        """Keeps the ids and weights of every training step (what brute force needs)."""
        seen = []

        def training_step(self, model, inputs, *args, **kwargs):
            self.seen.append((inputs["sample_id"].clone(), {k: v.detach().clone() for k, v in
                                                            model.state_dict().items()}))
            return super().training_step(model, inputs, *args, **kwargs)

    args = TrainingArguments(output_dir=str(kw.pop("out", "/tmp/metaql-hf-test")), per_device_train_batch_size=batch,
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
    trainer.training_step = super(type(trainer), trainer).training_step
    with pytest.raises(metaql.InvalidInputException, match="no 'sample_id' column"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    con.close()
