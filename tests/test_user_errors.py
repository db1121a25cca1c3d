"""What a user gets back from wrong input: a clear MetaQL error at the right place (line, column,
caret; the argument at fault; what to do), never a silent wrong answer or a Python traceback.
Each test here failed on the code before its fix."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

import metaql
from metaql.engine.functions import SetName
from tests.models import MLP


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLP (fc1, fc2) captured at one checkpoint over 12 train samples; 4 test samples."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("user_errors") / "store")
    model, x, y = MLP(), torch.randn(16, 6), torch.randint(0, 3, (16,))
    with metaql.connect(path, config={"progress": False}) as c:
        c.add_samples(np.arange(12), "train", y[:12].numpy(), x[:12])
        c.add_samples(np.arange(12, 16), "test", y[12:].numpy(), x[12:])
        with c.capture(model, checkpoint="c0", lr=0.1, factory="tests.models:MLP", kwargs=model.metaql_config) as cap:
            cap.backward(F.cross_entropy(model(x[:12]), y[:12]), np.arange(12))
        c.execute("CREATE SET few AS SELECT sample_id FROM samples WHERE sample_id < 4")
    return path


@pytest.fixture
def con(store):
    with metaql.connect(store, config={"progress": False, "trusted_factories": ["tests.models:MLP"]}) as c:
        yield c


# ---- parse errors of plain SQL keep DuckDB's line and column, with a caret ----------------------
def test_a_duckdb_syntax_error_says_line_and_column_with_a_caret(con):
    with pytest.raises(metaql.ParserException) as e:
        con.execute("SELECT sample_id\n  FROM samples WHERE WHERE label = 1")
    assert (e.value.line, e.value.column) == (2, 22)
    assert str(e.value).splitlines()[1:] == ["    FROM samples WHERE WHERE label = 1",
                                             "                       ^^^^^"]


def test_a_syntax_error_around_a_call_is_placed_in_the_users_text_before_the_call_runs(con):
    runs = []

    def counted(ctx, data: SetName) -> pa.Table:
        """Counts its runs."""
        runs.append(data)
        return pa.table({"sample_id": ctx.store.set_ids(data)})

    con.register_function(counted)
    with pytest.raises(metaql.ParserException) as e:
        con.execute("SELECT *\n  FROM counted(data=train) AS c\n  WHERE WHERE sample_id > 1")
    assert (e.value.line, e.value.column) == (3, 9)
    assert str(e.value).splitlines()[-2:] == ["    WHERE WHERE sample_id > 1", "          ^^^^^"]
    with pytest.raises(metaql.ParserException) as e:
        con.execute("SELECT * FROM counted(data=train) c WHERE WHERE 1")
    assert e.value.column == 43 and "counted(data=train)" in str(e.value)
    assert runs == []


# ---- TOPK(k) <set> and a train= of the call's own -------------------------------------------------
@pytest.mark.parametrize("call", ["SELF_INFLUENCE(train=batch(few))", "SELF_INFLUENCE(*, few)",
                                  "INFLUENCE(query=batch(test), train=point(3))"])
def test_topk_refuses_a_call_whose_train_names_another_side(con, call):
    with pytest.raises(metaql.BinderException, match=r"TOPK\(2\) train ranks the set train.*leave train= out"):
        con.execute(f"SELECT TOPK(2) train FROM {call} ORDER BY DESC")
    with pytest.raises(metaql.BinderException, match="leave train= out"):
        con.execute(f"EXPLAIN SELECT TOPK(2) train FROM {call} ORDER BY DESC")


def test_topk_takes_a_train_that_names_its_own_set(con):
    same = con.execute("SELECT TOPK(2) few FROM SELF_INFLUENCE(train=batch(few)) ORDER BY DESC").fetchall()
    assert same == con.execute("SELECT TOPK(2) few FROM SELF_INFLUENCE() ORDER BY DESC").fetchall()
    assert {i for i, _ in same} <= {0, 1, 2, 3}


# ---- direction= outside the train x query matrix ---------------------------------------------------
@pytest.mark.parametrize("direction", ["opponents", "both"])
def test_direction_without_each_is_refused_not_ignored(con, direction):
    with pytest.raises(metaql.BinderException, match=f"direction={direction} chooses .* query=each"):
        con.execute(f"SELECT * FROM INFLUENCE(query=batch(test), direction={direction})")
    with pytest.raises(metaql.BinderException, match="ORDER BY ASC"):
        con.influence(query=(torch.randn(2, 6), torch.tensor([0, 1])), direction=direction)
    assert len(con.execute("SELECT * FROM INFLUENCE(query=batch(test), direction=proponents)").fetchall()) == 12


# ---- a read-only store -------------------------------------------------------------------------------
def test_update_predictions_on_a_read_only_store_says_so_before_predicting(store, monkeypatch):
    with metaql.connect(store, read_only=True, config={"trusted_factories": ["tests.models:MLP"]}) as ro:
        monkeypatch.setattr(ro.store, "model_at", lambda *a: pytest.fail("predicted on a read-only store"))
        with pytest.raises(metaql.IOException, match="read-only; reopen it without read_only"):
            ro.update_predictions()


# ---- metaql demo -----------------------------------------------------------------------------------
@pytest.mark.parametrize("epochs", ["0", "-3"])
def test_demo_refuses_epochs_that_capture_nothing_and_leaves_no_store(tmp_path, capsys, epochs):
    from metaql.demo import main
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "d.mq"), "--epochs", epochs])
    assert e.value.code != 0 and "--epochs: expected a whole number of epochs >= 1" in capsys.readouterr().err
    assert not (tmp_path / "d.mq").exists()


# ---- python -m metaql ----------------------------------------------------------------------------
def test_python_dash_m_metaql_is_the_metaql_command(store):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "metaql", store, "-readonly", "-csv", "-c",
                          "SELECT count(*) AS n FROM samples"], capture_output=True, text=True, timeout=300)
    assert (out.returncode, out.stdout, out.stderr) == (0, "n\n16\n", "")


# ---- DROP SET of a split -------------------------------------------------------------------------
def test_drop_set_of_a_split_says_it_is_a_split(con):
    with pytest.raises(metaql.CatalogException, match="'train' is a split .* a split cannot be dropped"):
        con.execute("DROP SET train")
    con.execute("DROP SET IF EXISTS train")         # no set of that name: nothing to do, as before
    assert con.execute("SELECT count(*) FROM samples WHERE split = 'train'").fetchone() == (12,)


# ---- con.table of a split ------------------------------------------------------------------------
def test_table_of_a_split_is_its_sample_ids_like_a_set(con):
    assert con.table("test").fetchall() == [(12,), (13,), (14,), (15,)]
    assert con.table("few").fetchall() == [(0,), (1,), (2,), (3,)]
    assert con.table("train").join(con.table("few"), "sample_id").shape == (4, 1)
    with pytest.raises(metaql.CatalogException, match="no table, view, registered object, set or split"):
        con.table("tset")


# ---- DESCRIBE and SHOW FUNCTIONS write defaults as a statement does ---------------------------------
def test_describe_writes_defaults_in_metaql_syntax_not_python(con):
    defaults = {a: d for a, _, d in con.execute("DESCRIBE INFLUENCE").fetchall()}
    assert (defaults["layers"], defaults["total"], defaults["topk"], defaults["train"]) == ("*", "false", "(none)",
                                                                                           "'train'")
    shown = {name: arguments for name, arguments, _ in con.execute("SHOW FUNCTIONS").fetchall()}
    assert "layers: LayerList = *," in shown["SELF_INFLUENCE"] and "('*',)" not in shown["SELF_INFLUENCE"]
    assert "total: bool = false" in shown["INFLUENCE"] and "None" not in shown["INFLUENCE"]
    # each default, written into a call as DESCRIBE shows it, is accepted
    assert con.execute(f"SELECT count(*) FROM INFLUENCE(query=batch(test), layers={defaults['layers']}, "
                       f"total={defaults['total']}, train={defaults['train'].strip(chr(39))})").fetchone() == (12,)


# ---- cap.backward outside the capture's `with` ------------------------------------------------------
def test_backward_outside_the_with_is_refused_before_training(tmp_path):
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(8, 6), torch.randint(0, 3, (8,))
    with metaql.connect(str(tmp_path / "s"), config={"progress": False}) as c:
        c.add_samples(np.arange(8), "train", y.numpy(), x)
        cap = c.capture(model, checkpoint="c0", lr=0.1)          # the `with` forgotten
        with pytest.raises(metaql.ProgrammingError, match="before its `with` began.*inside `with con.capture"):
            cap.backward(F.cross_entropy(model(x), y), np.arange(8))
        assert all(p.grad is None for p in model.parameters())   # refused before the backward pass
        with c.capture(model, checkpoint="c1", lr=0.1) as done:
            done.backward(F.cross_entropy(model(x[:4]), y[:4]), np.arange(4))
        with pytest.raises(metaql.ProgrammingError, match="after its `with` ended .*'c1' is finished"):
            done.backward(F.cross_entropy(model(x[4:]), y[4:]), np.arange(4, 8))
        with pytest.raises(metaql.ProgrammingError, match="cap.record"):
            done.record(np.arange(4))
        assert c.execute("SELECT count(*) FROM SELF_INFLUENCE(checkpoints=[c1])").fetchone() == (4,)


# ---- two epochs under one checkpoint ----------------------------------------------------------------
def test_ids_seen_twice_in_one_capture_warn_once_and_a_resume_stays_silent(tmp_path):
    import warnings
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(8, 6), torch.randint(0, 3, (8,))
    with metaql.connect(str(tmp_path / "s"), config={"progress": False}) as c:
        c.add_samples(np.arange(8), "train", y.numpy(), x)
        with pytest.warns(metaql.Warning, match=r"already captured for checkpoint 'c0'.*not stored") as seen:
            with c.capture(model, checkpoint="c0", lr=0.1) as cap:
                for epoch in range(3):
                    for ids in (np.arange(4), np.arange(4, 8)):
                        cap.backward(F.cross_entropy(model(x[ids]), y[ids]), ids)
        assert sum("already captured" in str(w.message) for w in seen) == 1
        with pytest.raises(RuntimeError):           # a run killed after its first batch
            with c.capture(model, checkpoint="c1", lr=0.1) as cap:
                cap.backward(F.cross_entropy(model(x[:4]), y[:4]), np.arange(4))
                raise RuntimeError("killed")
        with warnings.catch_warnings():
            warnings.simplefilter("error", metaql.Warning)
            with c.capture(model, checkpoint="c1", lr=0.1) as cap:     # resumed: skips 0-3 silently
                for ids in (np.arange(4), np.arange(4, 8)):
                    cap.backward(F.cross_entropy(model(x[ids]), y[ids]), ids)
        assert c.execute("SELECT count(*) FROM SELF_INFLUENCE(checkpoints=[c1])").fetchone() == (8,)


def test_a_resume_with_another_model_is_refused_and_another_lr_keeps_the_recorded_one(tmp_path):
    """Reusing a checkpoint's name with another architecture stored the other model's layers into it
    (queries then failed on an unknown layer). The lr is the checkpoint's, recorded when it began: a
    resume under a scheduler's later lr (the Hugging Face Trainer's linear decay) goes on."""
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(8, 6), torch.randint(0, 3, (8,))
    with metaql.connect(str(tmp_path / "s"), config={"progress": False}) as c:
        c.add_samples(np.arange(8), "train", y.numpy(), x)
        with c.capture(model, checkpoint="c1", lr=0.1) as cap:
            cap.backward(F.cross_entropy(model(x[:4]), y[:4]), np.arange(4))
        other = torch.nn.Sequential(torch.nn.Linear(6, 3))
        with pytest.raises(metaql.InvalidInputException, match="another architecture.*capture a new checkpoint"):
            with c.capture(other, checkpoint="c1", lr=0.1) as cap:
                cap.backward(F.cross_entropy(other(x[4:]), y[4:]), np.arange(4, 8))
        assert [r[0] for r in c.execute("SHOW LAYERS").fetchall()] == ["fc1", "fc2"]
        assert c.execute("SELECT count(*) FROM SELF_INFLUENCE(checkpoints=[c1])").fetchone() == (4,)
        with c.capture(model, checkpoint="c1", lr=0.05) as cap:        # the same model resumes
            cap.backward(F.cross_entropy(model(x[4:]), y[4:]), np.arange(4, 8))
        assert c.execute("SELECT count(*) FROM SELF_INFLUENCE(checkpoints=[c1])").fetchone() == (8,)
        assert c.store.checkpoint("c1")["lr"] == 0.1


# ---- the shell's completion offers what the language takes ------------------------------------------
def test_completion_offers_each_and_first(store, tmp_path):
    import io
    import shutil
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document
    from metaql.completion import MetaQLCompleter
    from metaql.shell import Shell

    def completions(sh, text):
        return [c.text for c in MetaQLCompleter(sh).get_completions(Document(text), CompleteEvent(completion_requested=True))]

    with Shell(shutil.copytree(store, tmp_path / "s"), out=io.StringIO(), err=io.StringIO()) as sh:
        assert completions(sh, "SELECT * FROM INFLUENCE(query=") == ["batch(", "each(", "point("]
        assert completions(sh, "SELECT * FROM INFLUENCE(query=batch(test), train=") == ["batch(", "point("]
        assert completions(sh, "SELECT * FROM INFLUENCE(query=each(") == ["few", "test", "train"]
        assert completions(sh, "SELECT * FROM SELF_INFLUENCE(checkpoints=") == ["c0", "all", "first", "last"]


# ---- register_function with what no statement can call -----------------------------------------------
@pytest.mark.parametrize("args, kwargs, message", [
    ((5,), {}, "not int"),
    ((lambda ctx: pa.table({"a": [1]}),), {}, "not '<lambda>': pass name="),
    ((lambda ctx: pa.table({"a": [1]}),), {"name": "my scores"}, "not 'my scores'"),
])
def test_register_function_refuses_what_no_statement_can_call(con, args, kwargs, message):
    before = [r[0] for r in con.execute("SHOW FUNCTIONS").fetchall()]
    with pytest.raises(metaql.InvalidInputException, match=message):
        con.register_function(*args, **kwargs)
    assert [r[0] for r in con.execute("SHOW FUNCTIONS").fetchall()] == before
    con.register_function(lambda ctx: pa.table({"a": [1]}), name="one")
    assert con.execute("SELECT * FROM one()").fetchall() == [(1,)]


# ---- add_samples: ids beyond BIGINT, columns that are MetaQL's own -------------------------------------
def test_add_samples_refuses_an_id_past_int64_instead_of_wrapping_it(tmp_path):
    with metaql.connect(str(tmp_path / "s"), config={"progress": False}) as c:
        with pytest.raises(metaql.InvalidInputException, match="9223372036854775808 is too large"):
            c.add_samples([2 ** 63], "train", [1], torch.rand(1, 3))
        with pytest.raises(metaql.InvalidInputException, match="too large"):
            c.add_samples(np.array([1, 2 ** 64 - 1], dtype=np.uint64), "train", [1, 0], torch.rand(2, 3))
        assert c.execute("SELECT count(*) FROM samples").fetchone() == (0,)
        c.add_samples(np.array([2 ** 63 - 1], dtype=np.uint64), "train", [1], torch.rand(1, 3))
        assert c.execute("SELECT sample_id FROM samples").fetchall() == [(2 ** 63 - 1,)]


@pytest.mark.parametrize("column", ["split", "Label", "loss", "sample_id"])
def test_add_samples_refuses_a_column_named_like_metaqls_own(tmp_path, column):
    with metaql.connect(str(tmp_path / "s"), config={"progress": False}) as c:
        with pytest.raises(metaql.InvalidInputException, match=f"'{column}' is MetaQL's: pass the split as split="):
            c.add_samples([7], "train", [1], torch.rand(1, 3), columns={column: [9]})
        assert c.execute("SELECT count(*) FROM samples").fetchone() == (0,)


@pytest.mark.parametrize("split", [None, "", "  ", 5])
def test_add_samples_refuses_a_split_that_is_no_name(tmp_path, split):
    with metaql.connect(str(tmp_path / "s"), config={"progress": False}) as c:
        with pytest.raises(metaql.InvalidInputException, match="split must be a name such as 'train'"):
            c.add_samples([7], split, [1], torch.rand(1, 3))
        assert c.execute("SELECT count(*) FROM samples").fetchone() == (0,)


def test_explain_of_sql_that_cannot_parse_is_a_parse_error_not_a_plan(con):
    with pytest.raises(metaql.ParserException) as e:
        con.execute("EXPLAIN SELECT * FROM SELF_INFLUENCE() s WHERE WHERE 1")
    assert (e.value.line, e.value.column) == (1, 48)
    assert con.execute("EXPLAIN SELECT * FROM SELF_INFLUENCE() s WHERE score > 1").fetchall()


# ---- a checkpoint named twice is counted once ---------------------------------------------------------
@pytest.mark.parametrize("call", ["SELF_INFLUENCE(checkpoints={})", "INFLUENCE(query=batch(test), checkpoints={})",
                                  "INFLUENCE(query=each(test), checkpoints={})"])
def test_a_checkpoint_named_twice_counts_once(con, call):
    once = con.execute(f"SELECT * FROM {call.format('[c0]')} ORDER BY ALL").fetchall()
    assert con.execute(f"SELECT * FROM {call.format('[c0, c0]')} ORDER BY ALL").fetchall() == once


# ---- a table function named without its parentheses ------------------------------------------------
def test_a_table_function_without_parentheses_says_how_to_call_it(con):
    with pytest.raises(metaql.CatalogException, match=r"SELF_INFLUENCE is a table function: .* SELF_INFLUENCE\(\.\.\.\)"):
        con.execute("SELECT * FROM self_influence s JOIN samples USING (sample_id)")
    with pytest.raises(metaql.CatalogException, match="Table with name nosuch does not exist"):
        con.execute("SELECT * FROM nosuch")


# ---- PRAGMA metaql_calibrate mistyped ------------------------------------------------------------------
@pytest.mark.parametrize("sql", ["PRAGMA metaql_calibrat", "PRAGMA metaql_calibrate(fc1)", "CALL metaql_calibrate()"])
def test_a_mistyped_calibrate_pragma_names_the_right_one(con, sql):
    with pytest.raises(metaql.ProgrammingError, match="MetaQL's own is PRAGMA metaql_calibrate, without arguments"):
        con.execute(sql)


def test_an_unrelated_refused_pragma_does_not_mention_calibrate(con):
    with pytest.raises(metaql.ProgrammingError, match="is refused") as e:
        con.execute("PRAGMA enable_profiling")
    assert "metaql_calibrate" not in str(e.value)


# ---- an exception in the user's own table function ---------------------------------------------------
@pytest.mark.parametrize("sql", ["SELECT * FROM boom()", "SELECT count(*) FROM boom() b JOIN samples USING (sample_id)"])
def test_a_users_table_function_that_raises_is_named_not_reported_as_metaqls_bug(con, sql):
    def boom(ctx) -> pa.Table:
        """Fails."""
        raise ValueError("my bug")

    con.register_function(boom)
    with pytest.raises(metaql.InternalException, match=r"ValueError: my bug \(raised by table function BOOM, "
                                                       r".*boom, registered with register_function") as e:
        con.execute(sql)
    assert "please report" not in str(e.value)
    assert isinstance(e.value.__cause__, ValueError)       # the user's traceback is kept


# ---- a set's query that returns another samples column ---------------------------------------------------
@pytest.mark.parametrize("query", ["SELECT label FROM samples WHERE split = 'test'", "SELECT split FROM samples",
                                   "SELECT loss FROM samples"])
def test_a_set_of_another_samples_column_is_refused_not_read_as_ids(con, query):
    with pytest.raises(metaql.BinderException, match="not sample ids: select sample_id"):
        con.execute(f"CREATE OR REPLACE SET wrong AS {query}")
    assert "wrong" not in [r[0] for r in con.execute("SHOW SETS").fetchall()]
    assert con.execute("CREATE OR REPLACE SET fine AS SELECT sample_id AS id FROM samples WHERE split = 'test'"
                       ).fetchall() == [("set fine: 4 samples",)]
    assert con.execute("CREATE OR REPLACE SET fine AS VALUES (1), (2)").fetchall() == [("set fine: 2 samples",)]
    con.execute("DROP SET fine")        # the module's store is shared


# ---- a name in another case --------------------------------------------------------------------------
def test_a_set_named_in_another_case_is_the_hint(con):
    for name in ("x1", "X10"):
        con.execute(f"CREATE OR REPLACE SET {name} AS SELECT sample_id FROM samples WHERE sample_id IN (1, 2)")
    with pytest.raises(metaql.CatalogException, match=r"unknown set 'x10'. Did you mean 'X10'\? \(set names are "
                                                      r"case-sensitive\)"):      # not x1, the closer spelling
        con.execute("SELECT TOPK(1) x10 FROM SELF_INFLUENCE()")
    with pytest.raises(metaql.CatalogException, match=r"unknown set 'tset'. Did you mean 'test'\? Known"):
        con.execute("SELECT TOPK(1) tset FROM SELF_INFLUENCE()")
    con.execute("DROP SET x1; DROP SET X10")        # the module's store is shared


# ---- a parse error in CREATE SET's query -------------------------------------------------------------
def test_a_syntax_error_in_a_set_query_is_a_parse_error_placed_in_the_statement(con):
    with pytest.raises(metaql.ParserException) as e:
        con.execute("CREATE SET bad AS SELECT sample_id FROM samples WHERE WHERE label = 1")
    assert (e.value.line, e.value.column) == (1, 55)
    assert str(e.value).splitlines()[-2:] == ["  CREATE SET bad AS SELECT sample_id FROM samples WHERE WHERE label = 1",
                                              "  " + " " * 54 + "^^^^^"]
    assert "bad" not in [r[0] for r in con.execute("SHOW SETS").fetchall()]


def test_a_set_query_that_fails_keeps_duckdbs_did_you_mean(con):
    with pytest.raises(metaql.BinderException, match=r"the set's query failed: .*sampels does not exist!\n"
                                                     r"Did you mean \"samples\"\?"):
        con.execute("CREATE SET bad AS SELECT sample_id FROM sampels")


# ---- capture's warnings name the user's line -------------------------------------------------------------
def test_capture_warnings_point_at_the_users_call(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with metaql.connect(str(tmp_path / "s"), config={"progress": False}) as c:
        c.add_samples(np.arange(8), "train", y.numpy(), x)
        with pytest.warns(metaql.Warning) as seen, c.capture(model, checkpoint="c0", lr=0.1) as cap:
            for epoch in range(2):
                cap.backward(F.cross_entropy(model(x), y), np.arange(8))
    messages = {str(w.message).split(" ")[0]: w.filename for w in seen}
    assert {"per-sample", "sample"} <= set(messages)          # the BatchNorm warning and the repeated ids'
    assert set(messages.values()) == {__file__}, messages


def test_a_querys_warning_points_at_the_users_statement(tmp_path):
    torch.manual_seed(0)
    model, x, y = MLP(), torch.randn(8, 6), torch.randint(0, 3, (8,))
    with metaql.connect(str(tmp_path / "s"), config={"progress": False}) as c:
        c.add_samples(np.arange(8), "train", y.numpy(), x)
        with c.capture(model, checkpoint="c0", lr=0.1) as cap:
            cap.backward(F.cross_entropy(model(x), y), np.arange(8))
        with pytest.raises(RuntimeError), c.capture(model, checkpoint="c1", lr=0.1):
            raise RuntimeError("killed")                          # c1 is left partial
        with pytest.warns(metaql.Warning, match="left out checkpoint 'c1'") as seen:
            c.execute("SELECT count(*) FROM SELF_INFLUENCE()").fetchall()
        assert [w.filename for w in seen] == [__file__]


# ---- connect's config values ---------------------------------------------------------------------------
@pytest.mark.parametrize("config, message", [
    ({"device": "gpu"}, "must be a torch device such as 'cpu' or 'cuda', got 'gpu'"),
    ({"force_strategy": "iterat"}, "must name a strategy .*iterate.*got 'iterat'"),
    ({"topk_pruning": "maybe"}, "must be true, false or 'auto'"),
    ({"topk_pruning": 1}, "must be true, false or 'auto'"),           # 1 == True passed as true
    ({"auto_calibrate": "no"}, "must be true or false"),
])
def test_connect_refuses_config_values_that_would_fail_later_or_be_ignored(store, config, message):
    with pytest.raises(metaql.InvalidInputException, match=message):
        metaql.connect(store, read_only=True, config=config)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA takes device='cuda'")
def test_connect_refuses_cuda_where_torch_has_none(store):
    with pytest.raises(metaql.InvalidInputException, match="no CUDA device .* use 'cpu'"):
        metaql.connect(store, read_only=True, config={"device": "cuda"})


# ---- con.capture's own arguments -------------------------------------------------------------------------
@pytest.mark.parametrize("model, layers, message", [
    ("mlp", None, "con.capture takes a torch.nn.Module, got str"),
    (None, 5, r"layers= takes a module name, a glob pattern .* got 5"),
    (None, ["fc1", 2], r"layers= takes .* got \['fc1', 2\]"),
])
def test_capture_refuses_a_model_or_layers_it_cannot_use(con, model, layers, message):
    with pytest.raises(metaql.InvalidInputException, match=message):
        con.capture(MLP() if model is None else model, layers=layers, checkpoint="never", lr=0.1)
    assert "never" not in [r[0] for r in con.execute("SHOW CHECKPOINTS").fetchall()]


def test_a_bare_layer_as_the_model_says_to_wrap_it(tmp_path):
    with metaql.connect(str(tmp_path / "s"), config={"progress": False}) as c:
        with pytest.raises(metaql.CatalogException, match=r"the model has no submodules.*nn.Sequential"):
            c.capture(torch.nn.Linear(3, 3), checkpoint="c0", lr=0.1)
        model, x = torch.nn.Sequential(torch.nn.Linear(3, 3)), torch.randn(4, 3)
        c.add_samples(np.arange(4), "train", [0, 1, 2, 0], x)
        with c.capture(model, checkpoint="c0", lr=0.1) as cap:
            cap.backward(F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])), np.arange(4))
        assert c.execute("SELECT name FROM layers").fetchall() == [("0",)]


# ---- the shell: a script that reads itself -------------------------------------------------------------
def test_a_script_that_reads_itself_stops_with_an_error_not_a_traceback(store, tmp_path):
    import io
    from metaql.shell import MAX_READ_DEPTH, Shell
    script = tmp_path / "self.sql"
    script.write_text(f"SELECT 1 AS one;\n.read {script}\n")
    with Shell(store, read_only=True, out=io.StringIO(), err=io.StringIO()) as sh:
        assert sh.run_script(f".read {script}\nSELECT 2 AS two;") == 1
        err = sh.err.getvalue()
    assert f"files nested {MAX_READ_DEPTH} deep (does a file read itself?)" in err and "Traceback" not in err


# ---- SHOW FUNCTIONS describes each function in a whole sentence ------------------------------------------
def test_show_functions_descriptions_are_whole_sentences(con):
    described = {name: text for name, _, text in con.execute("SHOW FUNCTIONS").fetchall()}
    assert described["SELF_INFLUENCE"] == ("Squared gradient norm of each training sample (summed over layers, "
                                           "lr-weighted over checkpoints), from the factors only.")
    assert all(text.endswith((".", ")", ":")) for text in described.values()), described   # not mid-sentence


def test_a_query_over_an_empty_store_names_the_store_and_that_it_was_just_created(tmp_path):
    """A mistyped path made a new empty store, and the error ('the store has no captured layers
    yet') never said which store nor that it was new."""
    typo = tmp_path / "demoo.mq"
    with metaql.connect(str(typo)) as c:
        with pytest.raises(metaql.CatalogException, match=r"demoo\.mq, a new empty store this connection created"):
            c.execute("SELECT * FROM SELF_INFLUENCE(layers=*)")
    with metaql.connect(str(typo)) as c:
        with pytest.raises(metaql.CatalogException) as err:
            c.execute("SELECT * FROM SELF_INFLUENCE(layers=*)")
        assert "demoo.mq has no captured layers" in str(err.value) and "new empty" not in str(err.value)
    with metaql.connect(":memory:") as c:
        with pytest.raises(metaql.CatalogException, match=r"in-memory store \(:memory:\) has no captured layers"):
            c.execute("SELECT * FROM SELF_INFLUENCE(layers=*)")


def test_connect_says_what_a_store_path_is(tmp_path):
    """connect(None) raised pathlib's TypeError; a path to the catalog file inside a store, and a
    truncated catalog, gave DuckDB's own words."""
    with pytest.raises(metaql.InvalidInputException, match="store directory's path or ':memory:'"):
        metaql.connect(None)
    store = tmp_path / "s.mq"
    metaql.connect(str(store)).close()
    with pytest.raises(metaql.IOException, match=r"a file inside a store; pass the store's folder"):
        metaql.connect(str(store / "catalog.duckdb"))
    (store / "catalog.duckdb.wal").unlink(missing_ok=True)
    with open(store / "catalog.duckdb", "r+b") as f:
        f.truncate(5000)
    with pytest.raises(metaql.IOException, match=r"catalog .* is damaged .*restore it from a backup"):
        metaql.connect(str(store))


# ---- the first-time user's report: TOPK without its set, DESCRIBE and checkpoints= typos ---------------
def test_topk_without_the_set_to_rank_says_so_at_from(con):
    with pytest.raises(metaql.ParserException) as e:
        con.execute("SELECT TOPK(3) FROM SELF_INFLUENCE(layers=*) ORDER BY DESC")
    assert "TOPK(k) needs the set to rank before FROM, e.g. TOPK(3) train FROM" in str(e.value)
    assert "line 1, column 16" in str(e.value) and "\n" + " " * 17 + "^" in str(e.value)   # the caret at FROM


def test_describe_of_an_unknown_name_suggests_the_nearest_function_or_table(con):
    with pytest.raises(metaql.CatalogException, match="Did you mean INFLUENCE?"):
        con.execute("DESCRIBE INFLUENZE")
    with pytest.raises(metaql.CatalogException, match="Did you mean samples?"):
        con.execute("DESCRIBE sampls")
    assert con.execute("DESCRIBE samples").fetchone()[0] == "sample_id"     # DuckDB's DESCRIBE, untouched


def test_a_checkpoints_keyword_typo_suggests_the_keyword(con):
    with pytest.raises(metaql.CatalogException, match=r"unknown checkpoint 'lasst'. Did you mean 'last'\?"):
        con.execute("SELECT * FROM SELF_INFLUENCE(checkpoints=lasst)")


def test_an_empty_set_over_predictions_never_made_says_to_make_them(tmp_path):
    """`CREATE SET test_wrong AS ... pred <> label` before con.update_predictions() came out empty
    without a word, and the next INFLUENCE failed on an empty set."""
    with metaql.connect(str(tmp_path / "s")) as c:
        c.add_samples(np.arange(8), "train", np.arange(8) % 3, torch.randn(8, 6))
        msg = c.execute("CREATE SET w AS SELECT sample_id FROM samples WHERE pred <> label").fetchone()[0]
        assert msg.startswith("set w: 0 samples") and "con.update_predictions()" in msg
        assert c.execute("CREATE SET v AS SELECT sample_id FROM samples WHERE label = 7").fetchone()[0] == "set v: 0 samples"


def test_a_mistyped_keyword_of_capture_or_replay_names_the_right_one(tmp_path):
    """`con.capture(..., max_eror=0.5)` raised Python's TypeError from deep inside, naming nothing."""
    with metaql.connect(str(tmp_path / "s")) as c:
        c.add_samples(np.arange(8), "train", np.arange(8) % 3, torch.randn(8, 6))
        with pytest.raises(metaql.InvalidInputException, match=r"con.capture takes no argument max_eror=; did you mean max_error="):
            c.capture(MLP(), checkpoint="c0", lr=0.1, max_eror=0.5)
        with pytest.raises(metaql.InvalidInputException, match=r"con.replay takes no argument batch_sise=; did you mean batch_size="):
            c.replay("c0", batch_sise=4)
