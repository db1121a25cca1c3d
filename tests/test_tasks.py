"""Tasks: the loss recorded with the model is the loss of every replay; scores equal brute force
(torch.func per-sample gradients of that same loss)."""
import sys

import duckdb
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import metaql
from tests.bruteforce import rel_err
from tests.models import MLP


class TinyLM(nn.Module):
    """Embedding, a hidden Linear over tokens, a vocabulary head: logits (B, T, V)."""

    def __init__(self, vocab: int = 7, dim: int = 5):
        super().__init__()
        self.metaql_config = {"vocab": vocab, "dim": dim}
        self.emb = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(self.emb(x))))


class DictOutput(nn.Module):
    """A Hugging Face style sequence classifier: returns {'logits': ...}."""

    def __init__(self, din: int = 6, classes: int = 3):
        super().__init__()
        self.metaql_config = {"din": din, "classes": classes}
        self.fc1 = nn.Linear(din, 5)
        self.fc2 = nn.Linear(5, classes)

    def forward(self, x):
        return {"logits": self.fc2(torch.tanh(self.fc1(x))), "hidden_states": None}


def huber(output, target):
    """An importable per-sample loss: fn(output, target) -> (B,)."""
    return F.huber_loss(output.reshape(-1), target.float(), reduction="none", delta=0.5)


def _mse(out, y):
    return ((out.reshape(1, -1) - y.reshape(1, -1)) ** 2).sum()


def _lm_loss(logits, tokens, pad=0):
    """Mean next-token cross-entropy of one sample, pad tokens not counted (written independently)."""
    labels = tokens[1:].clone()
    keep = labels != pad
    ce = F.cross_entropy(logits[0, :-1], labels, reduction="none")
    return (ce * keep).sum() / keep.sum().clamp_min(1)


def _grads(model, layers, loss_one, x, y):
    """(B, P) per-sample gradients of `loss_one(output, y_i)` over the given layers' parameters."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return loss_one(out["logits"] if isinstance(out, dict) else out, yi)

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([v.reshape(v.shape[0], -1) for k, v in g.items() if k.rsplit(".", 1)[0] in layers], 1).double()


def _scores(con, layers):
    names = ", ".join(layers)
    inf = con.execute(f"SELECT sample_id, score FROM INFLUENCE(layers=[{names}], query=batch(test)) "
                      "ORDER BY sample_id").fetchnumpy()
    self_inf = con.execute(f"SELECT sample_id, score FROM SELF_INFLUENCE(layers=[{names}]) "
                           "ORDER BY sample_id").fetchnumpy()
    return torch.from_numpy(inf["score"]), torch.from_numpy(self_inf["score"])


def _expected(model, states, lrs, layers, loss_one, x, y, ntrain):
    inf, self_inf = torch.zeros(ntrain, dtype=torch.float64), torch.zeros(ntrain, dtype=torch.float64)
    for state, lr in zip(states, lrs):
        model.load_state_dict(state)
        g = _grads(model, layers, loss_one, x[:ntrain], y[:ntrain])
        gq = _grads(model, layers, loss_one, x[ntrain:], y[ntrain:]).mean(0)
        inf += lr * (g @ gq)
        self_inf += lr * (g * g).sum(1)
    return inf, self_inf


def _train(con, model, x, targets, task, ntrain, lrs, loss_of):
    """Checkpoint c0 captured in the loop with cap.loss; c1 registered with con.checkpoint and
    replayed. Returns the weights of each checkpoint."""
    ids = np.arange(len(x))
    factory = f"{type(model).__module__}:{type(model).__name__}"
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    with con.capture(model, layers="*", checkpoint="c0", lr=lrs[0], task=task, factory=factory,
                     kwargs=model.metaql_config) as cap:
        loss = loss_of(cap, model, x[:ntrain], targets[:ntrain])
        cap.backward(loss, ids[:ntrain])
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    states.append({k: v.clone() for k, v in model.state_dict().items()})
    con.checkpoint(model, "c1", lr=lrs[1], task=task, factory=factory, kwargs=model.metaql_config)
    assert con.replay("c1", "train") == ntrain
    return states


def test_regression_scores_are_those_of_mse(store_dir):
    torch.manual_seed(0)
    n, ntrain, lrs = 12, 8, [0.5, 0.2]
    model, x, y = MLP(din=6, hidden=5, classes=2), torch.randn(12, 6), torch.randn(12, 2)
    task = {"task": "regression", "target": ["y0", "y1"]}
    ids = np.arange(n)
    with metaql.connect(store_dir) as con:
        for split, rows in (("train", slice(0, ntrain)), ("test", slice(ntrain, n))):
            con.add_samples(ids[rows], split, inputs=x[rows],
                            columns={"y0": y[rows, 0].double().numpy(), "y1": y[rows, 1].double().numpy()})
        states = _train(con, model, x, y, task, ntrain, lrs, lambda cap, m, xb, yb: cap.loss(m(xb), yb))
        inf, self_inf = _scores(con, ["fc1", "fc2"])
        with pytest.raises(metaql.BinderException, match="loss=pred is not defined for a regression model"):
            con.execute("SELECT * FROM INFLUENCE(query=batch(test), loss=pred)")
        assert con.update_predictions() == n
        got = con.execute("SELECT loss FROM samples ORDER BY sample_id").fetchnumpy()
        spec = con.execute("SELECT DISTINCT loss FROM models").fetchall()
        assert con.execute("SELECT count(pred) FROM samples").fetchone() == (0,)    # no class to predict
    exp_inf, exp_self = _expected(model, states, lrs, ["fc1", "fc2"], _mse, x, y, ntrain)
    assert rel_err(inf, exp_inf) < 1e-5 and rel_err(self_inf, exp_self) < 1e-5
    with torch.no_grad():
        assert np.allclose(got["loss"], ((model(x) - y) ** 2).sum(1).numpy(), rtol=1e-5)
    assert spec == [('{"target": ["y0", "y1"], "task": "regression"}',)]


def test_causal_lm_scores_are_those_of_token_level_loss(store_dir):
    torch.manual_seed(1)
    n, ntrain, lrs = 10, 7, [0.4, 0.3]
    model = TinyLM()
    x = torch.randint(1, 7, (n, 6))
    x[::3, 4:] = 0                                 # padded sequences: pad tokens carry no loss
    task = {"task": "causal_lm", "pad_token_id": 0}
    ids = np.arange(n)
    with metaql.connect(store_dir) as con:
        con.add_samples(ids[:ntrain], "train", inputs=x[:ntrain])
        con.add_samples(ids[ntrain:], "test", inputs=x[ntrain:])
        states = _train(con, model, x, x, task, ntrain, lrs, lambda cap, m, xb, _: cap.loss(m(xb), inputs=xb))
        layers = [r[0] for r in con.execute("SELECT name FROM layers ORDER BY name").fetchall()]
        inf, self_inf = _scores(con, layers)
    assert layers == ["emb", "head", "hidden"]
    exp_inf, exp_self = _expected(model, states, lrs, layers, lambda out, t: _lm_loss(out, t), x, x, ntrain)
    assert rel_err(inf, exp_inf) < 1e-5 and rel_err(self_inf, exp_self) < 1e-5


def test_causal_lm_loss_matches_hugging_face_convention():
    from metaql.storage.tasks import CausalLM
    torch.manual_seed(2)
    logits, ids = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    labels = ids.clone()
    labels[0, 3:] = -100
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[2, 4] = 0
    got = CausalLM().losses(logits, ids, labels, attention_mask=mask)
    labels[2, 4] = -100
    for i in range(3):   # HF: shift, then the mean over the sample's tokens whose label is not -100
        want = F.cross_entropy(logits[i, :-1], labels[i, 1:], ignore_index=-100)
        assert torch.allclose(got[i], want)
    summed = CausalLM(reduction="sum").losses(logits, ids, labels)
    assert torch.allclose(summed[1], F.cross_entropy(logits[1, :-1], labels[1, 1:], reduction="sum"))


def test_sequence_classification_reads_logits_of_dict_outputs(store_dir):
    torch.manual_seed(3)
    n, ntrain, lrs = 10, 7, [0.5, 0.1]
    model, x, y = DictOutput(), torch.randn(n, 6), torch.randint(0, 3, (n,))
    ids = np.arange(n)
    with metaql.connect(store_dir) as con:
        con.add_samples(ids[:ntrain], "train", y[:ntrain].numpy(), x[:ntrain])
        con.add_samples(ids[ntrain:], "test", y[ntrain:].numpy(), x[ntrain:])
        states = _train(con, model, x, y, "sequence_classification", ntrain, lrs,
                        lambda cap, m, xb, yb: cap.loss(m(xb), yb))
        inf, self_inf = _scores(con, ["fc1", "fc2"])
        con.update_predictions()
        pred = con.execute("SELECT pred FROM samples ORDER BY sample_id").fetchnumpy()["pred"]
    exp_inf, exp_self = _expected(model, states, lrs, ["fc1", "fc2"],
                                  lambda out, t: F.cross_entropy(out, t.reshape(1)), x, y, ntrain)
    assert rel_err(inf, exp_inf) < 1e-5 and rel_err(self_inf, exp_self) < 1e-5
    assert (pred == model(x)["logits"].argmax(1).numpy()).all()


def _huber_store(store_dir):
    torch.manual_seed(4)
    n, ntrain, lrs = 10, 7, [0.5, 0.25]
    model, x = MLP(din=6, hidden=5, classes=1), torch.randn(n, 6)
    y = torch.randint(0, 3, (n,))          # integer targets in samples.label, read by the loss
    ids = np.arange(n)
    with metaql.connect(store_dir) as con:
        con.add_samples(ids[:ntrain], "train", y[:ntrain].numpy(), x[:ntrain])
        con.add_samples(ids[ntrain:], "test", y[ntrain:].numpy(), x[ntrain:])
        states = _train(con, model, x, y, huber, ntrain, lrs, lambda cap, m, xb, yb: cap.loss(m(xb), yb))
        in_process = _scores(con, ["fc1", "fc2"])
    expected = _expected(model, states, lrs, ["fc1", "fc2"], lambda out, t: huber(out, t.reshape(1)).sum(),
                         x, y, ntrain)
    return in_process, expected


def test_custom_loss_equals_bruteforce_in_process(store_dir):
    (inf, self_inf), (exp_inf, exp_self) = _huber_store(store_dir)
    assert rel_err(inf, exp_inf) < 1e-5 and rel_err(self_inf, exp_self) < 1e-5


def test_received_store_never_imports_its_loss_unless_trusted(store_dir, tmp_path, monkeypatch):
    """A store names its loss code; a fresh process imports it only once told to trust it."""
    _, (exp_inf, _) = _huber_store(store_dir)
    mod = "received_loss_mod"
    (tmp_path / f"{mod}.py").write_text(
        f"import pathlib\npathlib.Path({str(tmp_path / 'imported')!r}).touch()\nfrom tests.test_tasks import huber\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    db = duckdb.connect(f"{store_dir}/catalog.duckdb")
    db.execute("UPDATE models SET loss = ?", [f'{{"loss": "{mod}:huber", "target": "label", "task": "custom"}}'])
    db.close()
    model_code = {"trusted_factories": ["tests.models:MLP"]}
    with metaql.connect(store_dir, config=model_code) as con:
        with pytest.raises(metaql.BinderException, match=f"not trusted.*'trusted_factories': \\['{mod}:huber'\\]"):
            con.execute("SELECT * FROM INFLUENCE(query=batch(test))")
    assert not (tmp_path / "imported").exists() and mod not in sys.modules
    trusted = {"trusted_factories": ["tests.models:MLP", f"{mod}:huber"]}
    with metaql.connect(store_dir, config=trusted) as con:
        got = con.execute("SELECT score FROM INFLUENCE(query=batch(test)) ORDER BY sample_id").fetchnumpy()
    assert (tmp_path / "imported").exists()
    assert rel_err(torch.from_numpy(got["score"]), exp_inf) < 1e-5


def test_task_errors_say_what_to_do(store_dir):
    model = MLP()
    with metaql.connect(store_dir) as con:
        con.add_samples([0, 1], "train", [0, 1], torch.randn(2, 6))
        with pytest.raises(metaql.InvalidInputException, match="unknown task 'regresion'.*regression"):
            con.capture(model, task="regresion")
        with pytest.raises(metaql.InvalidInputException, match="no option \\['ignore'\\]"):
            con.checkpoint(model, "c0", lr=0.1, task={"task": "causal_lm", "ignore": 0})
        with pytest.raises(metaql.InvalidInputException, match="'target' names the samples column"):
            con.capture(model, task={"task": "regression", "target": 3})
        with pytest.raises(metaql.InvalidInputException, match="not importable by that name"):
            con.capture(model, task=lambda out, y: out)
        assert con.execute("SELECT count(*) FROM checkpoints").fetchone() == (0,)
        con.checkpoint(model, "c0", lr=0.1)
        with pytest.raises(metaql.InvalidInputException, match="'c0' was captured with the task .*classification"):
            con.capture(model, checkpoint="c0", task="regression").__enter__()
    db = duckdb.connect(f"{store_dir}/catalog.duckdb")
    db.execute("UPDATE models SET loss = '{\"task\": \"telepathy\"}'")
    db.close()
    with metaql.connect(store_dir, config={"trusted_factories": ["tests.models:MLP"]}) as con:
        with pytest.raises(metaql.IOException, match="task .* not a task spec.*tampered"):
            con.replay("c0", "train")


def test_gpt2_causal_lm_scores_equal_bruteforce():
    """A 1-layer GPT-2 built from a transformers config, captured with its token-level loss."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=11, n_positions=8, bos_token_id=1,
                                  eos_token_id=1, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    x = torch.randint(1, 11, (9, 6))
    x[::3, 4:] = 0
    layers = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    with metaql.connect(":memory:") as con:
        con.add_samples(np.arange(6), "train", inputs=x[:6])
        con.add_samples(np.arange(6, 9), "test", inputs=x[6:])
        # rebuilt from its transformers config (saved with the weights) in any process
        with con.capture(model, layers=layers, checkpoint="c0", lr=0.5,
                         task={"task": "causal_lm", "pad_token_id": 0}) as cap:
            cap.backward(cap.loss(model(x[:6]), inputs=x[:6]), np.arange(6))
        inf, self_inf = _scores(con, layers)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    exp_inf, exp_self = _expected(model, [state], [0.5], layers, lambda out, t: _lm_loss(out, t), x, x, 6)
    assert rel_err(inf, exp_inf) < 1e-5 and rel_err(self_inf, exp_self) < 1e-5
