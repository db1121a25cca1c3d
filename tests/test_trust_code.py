"""A store never makes MetaQL run the code it names: a recorded factory is called only when this
process trusts it (config trusted_factories, the shell's --model, factory= at capture, or MetaQL's
own demo model), or the model comes from con.attach_model; kwargs are plain JSON data."""
import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metaql
from metaql import cli
from metaql.storage import models as model_files
from metaql.storage.models import UntrustedFactoryError
from tests.models import MLP

REAL = "tests.models:MLP"
INFLUENCE = "SELECT TOPK(3) train FROM INFLUENCE(query=batch(test)) ORDER BY ASC"


def build_store(path: Path) -> list:
    """A real store (an MLP captured at c0, inputs for replay); returns its INFLUENCE answer."""
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(10, 6), torch.randint(0, 3, (10,))
    with metaql.connect(str(path)) as con:
        con.add_samples(np.arange(8), "train", y[:8].numpy(), x[:8])
        con.add_samples(np.arange(8, 10), "test", y[8:].numpy(), x[8:])
        with con.capture(model, checkpoint="c0", lr=0.1, factory=REAL, kwargs=model.metaql_config) as cap:
            cap.backward(F.cross_entropy(model(x[:8]), y[:8]), np.arange(8))
        return con.execute(INFLUENCE).fetchall()


def tamper(path: Path, factory, kwargs) -> None:
    """Rewrites the models row with a raw DuckDB connection, as a hostile sender would."""
    db = duckdb.connect(str(path / "catalog.duckdb"))
    try:
        db.execute("UPDATE models SET factory = ?, kwargs = ?", [factory, kwargs])
    finally:
        db.close()


def hostile_cases(tmp: Path) -> dict:
    marker, victim = tmp / "pwned", tmp / "victim"
    cmd = f"touch {marker}"
    return {
        "subprocess:getoutput": {"cmd": cmd},
        "os:system": {"command": cmd},
        "builtins:eval": {"source": f"__import__('os').system({cmd!r})"},
        "shutil:rmtree": {"path": str(victim)},
        "metaql.demo:shutil.rmtree": {"path": str(victim)},   # inside metaql's package, still not trusted
    }


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("real") / "s.mq"
    return path, build_store(path)


def copy_of(store, tmp: Path) -> Path:
    """A fresh copy of the real store (building one per test would cost a capture each)."""
    path = tmp / "s.mq"
    shutil.copytree(store[0], path)
    return path


@pytest.fixture(scope="module", params=list(hostile_cases(Path("/x"))))
def hostile(request, tmp_path_factory, real_store):
    tmp = tmp_path_factory.mktemp("hostile")
    (tmp / "victim").mkdir()
    (tmp / "victim" / "keep.txt").write_text("mine")
    path = copy_of(real_store, tmp)
    factory = request.param
    tamper(path, factory, json.dumps(hostile_cases(tmp)[factory]))
    return path, tmp, factory


def untouched(tmp: Path) -> bool:
    return not (tmp / "pwned").exists() and (tmp / "victim" / "keep.txt").read_text() == "mine"


OPERATIONS = {
    "influence": lambda con: con.execute(INFLUENCE).fetchall(),
    "explain_analyze": lambda con: con.execute(f"EXPLAIN ANALYZE {INFLUENCE}").fetchall(),
    "update_predictions": lambda con: con.update_predictions(),
    "replay": lambda con: con.replay("c0", "test"),
}


@pytest.mark.parametrize("op", list(OPERATIONS))
def test_a_hostile_factory_never_runs(hostile, op):
    path, tmp, factory = hostile
    with metaql.connect(str(path)) as con:
        with pytest.raises(UntrustedFactoryError) as err:
            OPERATIONS[op](con)
    assert untouched(tmp)
    msg = str(err.value)
    assert f"'{factory}' with kwargs {{" in msg
    assert "trusted_factories" in msg and "attach_model" in msg and "--model" in msg


def test_a_hostile_factory_never_runs_from_the_readonly_shell(hostile, capsys):
    path, tmp, factory = hostile
    assert cli.main([str(path), "--readonly", "-c", INFLUENCE + ";"]) == 1
    assert untouched(tmp)
    assert factory in capsys.readouterr().err


@pytest.mark.parametrize("factory", ["builtins:eval", "os:system"])
def test_trusting_a_builtin_still_never_calls_it(real_store, tmp_path, factory):
    path = copy_of(real_store, tmp_path)
    tamper(path, factory, json.dumps(hostile_cases(tmp_path)[factory]))
    with metaql.connect(str(path), config={"trusted_factories": [factory]}) as con:
        with pytest.raises(metaql.BinderException, match="not an nn.Module class or a plain function"):
            con.execute(INFLUENCE)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(metaql.BinderException, match="dunder"):
        metaql.connect(str(path), config={"trusted_factories": ["tests.models:MLP.__init__.__globals__"]})


def test_a_real_factory_is_untrusted_in_a_new_connection(real_store):
    path, _ = real_store
    with metaql.connect(str(path), read_only=True) as con:
        with pytest.raises(UntrustedFactoryError, match=r"tests\.models:MLP.*\"din\": 6"):
            con.execute(INFLUENCE)
        assert con.execute("SELECT count(*) FROM samples").fetchone()[0] == 10   # the rest of the store works


def test_config_trusted_factories_rebuilds_the_model(real_store):
    path, expected = real_store
    with metaql.connect(str(path), read_only=True, config={"trusted_factories": [REAL]}) as con:
        assert con.execute(INFLUENCE).fetchall() == expected


def test_attach_model_gives_the_architecture_and_the_store_the_weights(real_store):
    path, expected = real_store
    torch.manual_seed(123)   # other weights than the checkpoint's: they must not be used
    with metaql.connect(str(path), read_only=True) as con:
        con.attach_model(MLP())
        assert con.execute(INFLUENCE).fetchall() == expected
        with pytest.raises(metaql.InvalidInputException, match="nn.Module"):
            con.attach_model("tests.models:MLP")


def test_the_shell_model_flag_trusts_a_factory(real_store, capsys):
    path, _ = real_store
    assert cli.main([str(path), "--readonly", "--mode", "csv", "--model", REAL, "-c", INFLUENCE + ";"]) == 0
    assert capsys.readouterr().out.count("\n") == 4   # header and three rows
    assert cli.main([str(path), "--model", "os.system", "-c", "SELECT 1;"]) == 1
    assert "not a model factory" in capsys.readouterr().err


def test_trusted_routes_replay_and_predict(real_store, tmp_path):
    path = copy_of(real_store, tmp_path)
    with metaql.connect(str(path), config={"trusted_factories": [REAL]}) as con:
        assert con.update_predictions() == 10
        assert con.replay("c0", "test") == 2


def test_the_config_value_is_checked():
    with pytest.raises(metaql.InvalidInputException, match="list of"):
        metaql.connect(config={"trusted_factories": REAL})
    for bad in ("tests.models", "a:b:c", "a b:c", "x:__import__", ""):
        with pytest.raises(metaql.BinderException, match="not a model factory"):
            metaql.connect(config={"trusted_factories": [bad]})


JUNK_KWARGS = ["not json", "[1, 2]", '{"din": NaN}', '{"1x": 1}', "[" * 100_000, '{"din": 6', "x" * (2 << 20)]


def test_junk_kwargs_say_the_store_was_tampered_with(real_store, tmp_path):
    path = copy_of(real_store, tmp_path)
    for kwargs in JUNK_KWARGS:
        tamper(path, REAL, kwargs)
        with metaql.connect(str(path), read_only=True, config={"trusted_factories": [REAL]}) as con:
            with pytest.raises(metaql.IOException, match="model kwargs are not valid JSON.*tampered"):
                con.execute(INFLUENCE)


def test_kwargs_that_do_not_fit_the_factory_are_a_clear_error(real_store, tmp_path):
    path = copy_of(real_store, tmp_path)
    tamper(path, REAL, json.dumps({"din": 6, "nope": {"__class__": "os:system"}}))
    with metaql.connect(str(path), read_only=True, config={"trusted_factories": [REAL]}) as con:
        with pytest.raises(metaql.BinderException, match="raised TypeError"):
            con.execute(INFLUENCE)


def test_corrupt_weights_are_an_io_error(real_store, tmp_path):
    path = copy_of(real_store, tmp_path)
    weights = path / "weights" / "c0.safetensors"
    for junk in (b"\x00garbage" * 10, weights.read_bytes()[:40]):
        weights.write_bytes(junk)
        with metaql.connect(str(path), read_only=True, config={"trusted_factories": [REAL]}) as con:
            with pytest.raises(metaql.IOException, match="corrupt or unreadable|do not match their checksum"):
                con.execute(INFLUENCE)


def test_weights_of_another_architecture_are_a_clear_error(real_store):
    path, _ = real_store
    with metaql.connect(str(path), read_only=True) as con:
        con.attach_model(MLP(hidden=7))
        with pytest.raises(metaql.BinderException, match="does not fit the weights"):
            con.execute(INFLUENCE)


def test_a_missing_model_row_is_an_io_error(real_store, tmp_path):
    path = copy_of(real_store, tmp_path)
    db = duckdb.connect(str(path / "catalog.duckdb"))
    db.execute("DELETE FROM models")
    db.close()
    with metaql.connect(str(path), read_only=True) as con:
        with pytest.raises(metaql.IOException, match="models table lacks"):
            con.execute(INFLUENCE)


def returns_a_dict(**kwargs):
    return dict(kwargs)


def test_a_trusted_factory_must_build_a_module(real_store, tmp_path):
    path = copy_of(real_store, tmp_path)
    factory = f"{__name__}:returns_a_dict"
    tamper(path, factory, "{}")
    with metaql.connect(str(path), read_only=True, config={"trusted_factories": [factory]}) as con:
        with pytest.raises(metaql.BinderException, match="returned a dict, not a torch.nn.Module"):
            con.execute(INFLUENCE)


def test_the_default_trust_is_exact_metaql_module_classes():
    for factory in model_files.DEFAULT_TRUSTED:
        module, _, name = factory.partition(":")
        cls = model_files._resolve(factory)
        # a MetaQL model class, or a MetaQL rebuilder of models recorded as data (nn.Sequential, HF)
        assert module.startswith("metaql.") and (isinstance(cls, type) and issubclass(cls, torch.nn.Module)
                                                 or factory in (model_files.SEQUENTIAL, model_files.HUGGINGFACE))
        assert f"{cls.__module__}:{cls.__qualname__}" == factory


def test_huge_kwargs_are_refused_before_anything_is_allocated(real_store, tmp_path):
    path = copy_of(real_store, tmp_path)
    huge = {"din": 6, "hidden": 10**12, "classes": 3, "bias": True}   # 24 TB of weights
    for factory, kwargs in ((REAL, huge), ("metaql.demo:DigitsMLP", {"hidden": 10**12})):   # the demo: trusted
        tamper(path, factory, json.dumps(kwargs))
        with metaql.connect(str(path), read_only=True, config={"trusted_factories": [REAL]}) as con:
            with pytest.raises(metaql.BinderException, match="does not fit the checkpoint's weights"):
                con.execute(INFLUENCE)


def test_a_model_class_of_a_script_says_how_the_shell_can_rebuild_it(real_store, tmp_path, capsys):
    """A class defined in a script (`__main__:Bag`) cannot be imported by another process; the
    error told a shell user to call con.attach_model, which the shell has no way to do."""
    path = copy_of(real_store, tmp_path)
    tamper(path, "__main__:Bag", "{}")
    assert cli.main([str(path), "--readonly", "-c", INFLUENCE + ";"]) == 1
    err = capsys.readouterr().err
    assert "defined in a script" in err and "--model mymodels:ClassName" in err and "attach_model" in err
