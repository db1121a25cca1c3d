"""Models rebuild in another process (issue #17): an nn.Sequential of torch.nn built-ins and a
Hugging Face model are recorded as data, a user's layer kind by its importable class; a fresh
process (and the shell) replays them with no attach_model, and scores equal brute force."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaql
from metaql.storage import models as model_files
from tests.bruteforce import per_sample_grads, rel_err

ROOT = Path(__file__).resolve().parent.parent

QUERIES = ["SELECT score FROM INFLUENCE(query=batch(test)) ORDER BY sample_id",
           "SELECT score FROM SELF_INFLUENCE() ORDER BY sample_id"]


def _fresh(path, *configs) -> dict | list[dict]:
    """Runs QUERIES in a new Python process that imports nothing of the test's models, once per
    config (one process: each start costs seconds of imports)."""
    code = ("import json, sys, metaql\n"
            "res = []\n"
            f"for config in {list(configs) or [None]!r}:\n"
            f"    with metaql.connect({str(path)!r}, read_only=True, config=config) as con:\n"
            "        out = {}\n"
            f"        for q in {QUERIES!r}:\n"
            "            try:\n"
            "                out[q] = [r[0] for r in con.execute(q).fetchall()]\n"
            "            except metaql.Error as e:\n"
            "                out[q] = type(e).__name__ + ': ' + str(e)\n"
            "        res.append(out)\n"
            "print(json.dumps(res))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    return res if len(configs) > 1 else res[0]


def _expected(model, x, y, ntrain, lr):
    flat = lambda g: torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], 1).double()   # noqa: E731
    g, gq = flat(per_sample_grads(model, x[:ntrain], y[:ntrain])), flat(per_sample_grads(model, x[ntrain:], y[ntrain:]))
    return lr * g @ gq.mean(0), lr * (g * g).sum(1)


def _sequential():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Dropout(0.2), nn.Sequential(nn.Linear(12, 5), nn.Tanh()), nn.Linear(5, 3))


@pytest.mark.e2e
def test_sequential_replays_in_a_fresh_process_and_the_shell(tmp_path):
    torch.manual_seed(0)
    model, x, y = _sequential(), torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1), model[1].running_var.uniform_(0.5, 2)
    with metaql.connect(tmp_path / "s") as con, warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)       # no "cannot rebuild" warning
        con.add_samples(np.arange(6), "train", y[:6].numpy(), x[:6])
        con.add_samples(np.arange(6, 8), "test", y[6:].numpy(), x[6:])
        con.checkpoint(model, "c0", lr=0.5)
        con.replay("c0", "train")
        factory, = con.execute("SELECT factory FROM models").fetchone()
    assert factory == model_files.SEQUENTIAL
    got = _fresh(tmp_path / "s")           # the old code: UntrustedFactoryError, attach_model needed
    inf, self_inf = _expected(model.eval(), x, y, 6, 0.5)
    assert rel_err(torch.tensor(got[QUERIES[0]], dtype=torch.float64), inf) < 1e-5, got
    assert rel_err(torch.tensor(got[QUERIES[1]], dtype=torch.float64), self_inf) < 1e-5
    shell = subprocess.run([sys.executable, "-m", "metaql.cli", str(tmp_path / "s"), "-c",
                            "SELECT count(*) AS n FROM INFLUENCE(query=batch(test));"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert shell.returncode == 0 and "6" in shell.stdout, shell.stdout + shell.stderr


def test_sequential_spec_rebuilds_only_what_it_describes():
    class Mine(nn.Module):
        def forward(self, x):
            return x
    assert model_files.sequential_recipe(nn.Sequential(nn.Linear(2, 2), Mine())) is None
    assert model_files.sequential_recipe(nn.Sequential(nn.ModuleList([nn.Linear(2, 2)]))) is None
    factory, kwargs = model_files.sequential_recipe(nn.Sequential(nn.Embedding(5, 3, padding_idx=0),
                                                                  nn.LSTM(3, 4, batch_first=True)))
    rebuilt = model_files.sequential(**json.loads(json.dumps(kwargs)))
    assert repr(rebuilt) == repr(nn.Sequential(nn.Embedding(5, 3, padding_idx=0), nn.LSTM(3, 4, batch_first=True)))
    # a store's spec names torch.nn classes only: never another callable
    for hostile in ({"class": "Module", "kwargs": {}}, {"class": "functional", "kwargs": {}},
                    {"class": "Linear", "kwargs": {"in_features": 2, "out_features": 2, "device": "meta"}} | {"x": 1}):
        try:
            model_files.sequential([["0", hostile]])
        except (metaql.Error, TypeError):
            pass
    with pytest.raises(metaql.BinderException, match="not a torch.nn module class"):
        model_files.sequential([["0", {"class": "os", "kwargs": {}}]])
    with pytest.raises(metaql.BinderException, match="not a model class of transformers"):
        model_files.huggingface("AutoConfig", {})


def test_a_tampered_sequential_spec_is_refused_before_allocating(tmp_path):
    model_files.save_weights(nn.Sequential(nn.Linear(2, 2)), tmp_path / "w.safetensors")
    huge = {"layers": [["0", {"class": "Linear", "kwargs": {"in_features": 10 ** 6, "out_features": 10 ** 6}}]]}
    with pytest.raises(metaql.BinderException, match="does not fit the checkpoint's weights"):
        model_files.build_model(model_files.SEQUENTIAL, json.dumps(huge), tmp_path / "w.safetensors")


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16, resid_pdrop=0,
                                  embd_pdrop=0, attn_pdrop=0, tie_word_embeddings=False, bos_token_id=1,
                                  eos_token_id=1)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_rebuilds_from_its_config_in_a_new_connection(tmp_path):
    """The fast check (the slow one below runs a fresh process): a connection that never saw the
    model rebuilds it from the class and config recorded with the weights."""
    torch.manual_seed(1)
    model, x = _tiny_gpt2(), torch.randint(1, 100, (4, 6))
    with metaql.connect(tmp_path / "g") as con:
        con.add_samples(np.arange(4), "train", inputs=x)
        con.checkpoint(model, "c0", lr=0.5, task={"task": "causal_lm"})
        factory, kwargs = con.execute("SELECT factory, kwargs FROM models").fetchone()
    assert factory == model_files.HUGGINGFACE and json.loads(kwargs)["cls"] == "GPT2LMHeadModel"
    with metaql.connect(tmp_path / "g") as con:          # the old code: the factory is not trusted
        assert con.replay("c0", "train", layers=["transformer.h.1.mlp.c_fc"]) == 4
        rebuilt = con.store.model_at("c0")
    assert type(rebuilt) is type(model) and rebuilt is not model
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x).logits, model(x).logits)


@pytest.mark.slow
def test_gpt2_rebuilds_from_its_config_in_a_fresh_process(tmp_path):
    torch.manual_seed(1)
    model, x = _tiny_gpt2(), torch.randint(1, 100, (5, 6))
    layers = ["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc", "lm_head"]
    with metaql.connect(tmp_path / "g") as con, warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        con.add_samples(np.arange(3), "train", inputs=x[:3])
        con.add_samples(np.arange(3, 5), "test", inputs=x[3:])
        con.checkpoint(model, "c0", lr=0.5, task={"task": "causal_lm"})
        con.replay("c0", "train", layers=layers)
        here = [[r[0] for r in con.execute(q).fetchall()] for q in QUERIES]
        kinds = dict(con.execute("SELECT name, kind FROM layers").fetchall())
    assert kinds["transformer.h.1.attn.c_attn"] == "hf_conv1d"
    got = _fresh(tmp_path / "g")           # the old code: the GPT2LMHeadModel factory is not trusted
    assert np.allclose(got[QUERIES[0]], here[0], rtol=1e-5) and np.allclose(got[QUERIES[1]], here[1], rtol=1e-5)


def test_a_user_kind_is_loaded_by_its_recorded_module_when_trusted(tmp_path):
    from tests.user_kind import GainNet
    torch.manual_seed(2)
    model, x, y = GainNet(), torch.randn(6, 4), torch.randint(0, 3, (6,))
    with metaql.connect(tmp_path / "k") as con:
        con.add_samples(np.arange(4), "train", y[:4].numpy(), x[:4])
        con.add_samples(np.arange(4, 6), "test", y[4:].numpy(), x[4:])
        con.checkpoint(model, "c0", lr=0.5, factory="tests.user_kind:GainNet", kwargs=model.metaql_config)
        con.replay("c0", "train")
        meta = dict(con.execute("SELECT name, meta FROM layers").fetchall())
    assert json.loads(meta["gain"])["kind_class"] == "tests.user_kind:GainKind"
    untrusted, got = _fresh(tmp_path / "k", {"trusted_factories": ["tests.user_kind:GainNet"]},
                            {"trusted_factories": ["tests.user_kind:GainNet", "tests.user_kind:GainKind"]})
    assert "tests.user_kind:GainKind" in untrusted[QUERIES[1]] and "not trusted" in untrusted[QUERIES[1]]
    inf, self_inf = _expected(model, x, y, 4, 0.5)
    assert rel_err(torch.tensor(got[QUERIES[0]], dtype=torch.float64), inf) < 1e-5, got
    assert rel_err(torch.tensor(got[QUERIES[1]], dtype=torch.float64), self_inf) < 1e-5


def test_a_plain_models_capture_does_not_import_transformers_modeling_code(tmp_path):
    """With transformers imported by other code (its modeling code lazily, on first use), capturing a
    plain torch model must not load that code: reading transformers.PreTrainedModel did, and cost the
    first capture 4.5 s here."""
    pytest.importorskip("transformers")
    code = f"""
import sys, numpy as np, torch, transformers, metaql
from torch import nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
    def forward(self, x):
        return self.fc(x)
model, x, y = Net(), torch.randn(8, 4), torch.randint(0, 3, (8,))
con = metaql.connect({str(tmp_path / "s.mq")!r})
con.add_samples(np.arange(8), "train", y.numpy(), x)
with con.capture(model, layers="*", checkpoint="c0", lr=0.1) as cap:
    cap.backward(torch.nn.functional.cross_entropy(model(x), y), np.arange(8))
print("transformers.modeling_utils" in sys.modules)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "False"


def test_a_model_that_cannot_be_rebuilt_warns_at_the_users_line_naming_where_to_fix_it(tmp_path):
    """The warning pointed into MetaQL's own code (stacklevel 4 from the store) and told a user of
    con.checkpoint to pass factory= to con.capture, which they never called."""
    class Local(nn.Module):              # <locals> in its name: no other process can import it
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)
    with metaql.connect(tmp_path / "s") as con:
        con.add_samples(np.arange(4), "train", np.arange(4) % 3, torch.randn(4, 4))
        with pytest.warns(UserWarning, match="cannot rebuild.*con.capture, con.checkpoint") as seen:
            con.checkpoint(Local(), "c0", lr=0.5)
    assert [w.filename for w in seen if "cannot rebuild" in str(w.message)] == [__file__]
