"""The shell: driven for real in a pseudo-terminal (pexpect), and its parts in-process (scripts, dot
commands, errors, exit codes, completion by position, highlighting)."""
import io
import os
import re
import shutil
import sys
from typing import Literal

import numpy as np
import pexpect
import pytest
import torch
import torch.nn.functional as F
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from pygments.token import Keyword, Name

import metaql
from metaql import SetName, cli
from metaql.completion import MetaQLCompleter, MetaQLLexer
from metaql.format import MODES
from metaql.shell import Shell, error_text, script_parts
from tests.models import MLP

# A prompt drawn on a fresh line (only terminal escapes between the line break and the prompt), so
# that redraws of the line being typed do not count as a new prompt.
FRESH_PROMPT = re.compile(r"\n(?:\x1b\[[0-9;?]*[A-Za-z]|\r)*metaql>")
START = 90       # seconds to import torch and open the store, on a busy machine
STEP = 30
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# A shell with a table function that takes 20 s unless cancelled, to press Ctrl-C on.
SLOW_SHELL = """
import sys, time
from metaql.shell import Shell

def slow(ctx, steps: int = 400):
    for _ in ctx.progress(range(steps), total=steps, desc="crunching"):
        ctx.check_interrupt()
        time.sleep(0.05)
    return {"steps": [steps]}

def stubborn(ctx, steps: int = 1200):
    print("stubborn started", file=sys.stderr, flush=True)
    for _ in range(steps):      # 60 s, never checking for a cancel
        time.sleep(0.05)
    return {"steps": [steps]}

with Shell(sys.argv[1]) as shell:
    shell.con.register_function(slow)
    shell.con.register_function(stubborn)
    sys.exit(shell.interactive())
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A small real store: 16 train and 8 test samples, a capture of a tiny MLP, a set `hard`."""
    path = str(tmp_path_factory.mktemp("store") / "s.mq")
    torch.manual_seed(0)
    x, y = torch.rand(24, 6), torch.randint(0, 3, (24,))
    with metaql.connect(path) as con:
        con.add_samples(np.arange(16), split="train", labels=y[:16].numpy(), inputs=x[:16])
        con.add_samples(np.arange(16, 24), split="test", labels=y[16:].numpy(), inputs=x[16:])
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with con.capture(model, layers=["fc1", "fc2"], checkpoint="epoch1", lr=0.1) as cap:
            for ids in np.array_split(np.arange(16), 2):
                cap.backward(F.cross_entropy(model(x[ids]), y[ids]), ids)
                opt.step()
                opt.zero_grad()
        con.execute("CREATE SET hard AS SELECT sample_id FROM samples WHERE split = 'train' AND sample_id < 4")
    return path


def copy_of(store: str, dest) -> str:
    """Each user gets its own copy: an open store is locked against other processes."""
    return shutil.copytree(store, str(dest))


@pytest.fixture(scope="module")
def terminals(store, tmp_path_factory):
    """Both terminal shells start together: most of a start is importing torch, and the two overlap."""
    tmp = tmp_path_factory.mktemp("terminals")
    def spawn(args, history):
        env = dict(os.environ, TERM="xterm", METAQL_HISTORY=str(tmp / history),
                   PROMPT_TOOLKIT_NO_CPR="1")    # no cursor-position queries that nobody answers
        return pexpect.spawn(sys.executable, args, env=env, cwd=str(tmp), dimensions=(30, 120),
                             encoding="utf-8", timeout=STEP)
    children = {"shell": spawn(["-m", "metaql.cli", copy_of(store, tmp / "s.mq")], "history"),
                "slow": spawn(["-c", SLOW_SHELL, ":memory:"], "slow_history"),
                "history": tmp / "history"}
    yield children
    for name in ("shell", "slow"):
        children[name].close(force=True)


def plain(terminal_text: str) -> str:
    """What the terminal shows as text: escapes and carriage returns removed."""
    return ESCAPE.sub("", terminal_text).replace("\r", "")


@pytest.mark.e2e
def test_interactive_session_in_a_terminal(terminals):
    child = terminals["shell"]
    child.expect(FRESH_PROMPT, timeout=START)
    assert "MetaQL" in child.before and ".help" in child.before

    # a statement over two lines runs at its ';' and prints a box
    child.send("SELECT split,\r")
    child.send("count(*) AS n FROM samples GROUP BY split ORDER BY split;\r")
    child.expect("2 rows")
    box = plain(child.before).splitlines()[-7:]
    assert box == ["┌─────────┬───────┐", "│  split  │   n   │", "│ varchar │ int64 │", "├─────────┼───────┤",
                   "│ test    │     8 │", "│ train   │    16 │", "└─────────┴───────┘"]
    child.expect(FRESH_PROMPT)

    # Tab completes a keyword by position, and a dot command
    child.send("SHOW LAY\t")
    child.expect("LAYERS")
    child.send(";\r")
    child.expect("2 rows")
    assert "fc1" in child.before and "fc2" in child.before and "factored" in child.before
    child.expect(FRESH_PROMPT)
    child.send(".set\t")     # .se is .separator, .schema, .sets, .shell
    child.expect("sets")
    child.send("\r")
    child.expect("1 row")
    assert "hard" in child.before
    child.expect(FRESH_PROMPT)

    # Ctrl-C drops the line being typed and gives a fresh prompt
    child.send("SELECT 1")
    child.send("\x03")
    child.expect(FRESH_PROMPT)
    child.send("SELECT 6*7 AS answer;\r")
    child.expect("1 row")
    assert re.search(r"│\s+42 │", child.before) and "Error" not in child.before
    child.expect(FRESH_PROMPT)

    # Ctrl-R finds the multi-line statement in the history; Enter takes it, Enter runs it
    child.send("\x12GROUP BY")
    child.expect("I-search")
    child.send("\r")
    child.send("\r")
    child.expect("2 rows")
    child.expect(FRESH_PROMPT)

    # errors print DuckDB's way, and the session goes on
    child.send("SELECT * FROM nope;\r")
    child.expect("Catalog Error: Table with name nope does not exist")
    child.expect(FRESH_PROMPT)

    child.send("\x04")   # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = terminals["history"].read_text()
    assert "+SELECT split,\n+count(*) AS n FROM samples GROUP BY split ORDER BY split;" in history


@pytest.mark.e2e       # fresh processes: CI's e2e step (the fast suite is near its 5-minute bound)
def test_ctrl_c_stops_a_running_statement_and_a_bar_shows_its_progress(terminals):
    child = terminals["slow"]
    child.expect(FRESH_PROMPT, timeout=START)
    child.send("SELECT * FROM slow();\r")
    child.expect(r"crunching: +\d+%")      # a progress bar on stderr, the terminal, after a second
    child.send("\x03")
    child.expect("Interrupted")
    child.expect(FRESH_PROMPT)
    child.send("SELECT 1 + 1 AS two;\r")
    child.expect("1 row")
    assert re.search(r"│\s+2 │", child.before)
    child.expect(FRESH_PROMPT)

    # one Ctrl-C also stops a table function that never checks for it (issue #18)
    child.send("SELECT * FROM stubborn();\r")
    child.expect("stubborn started")
    child.send("\x03")
    child.expect("Interrupted")
    child.expect(FRESH_PROMPT)
    child.send("\x03")                 # twice on an empty line: DuckDB's hint
    child.expect(FRESH_PROMPT)
    child.send("\x03")
    child.expect("Interrupted, use Ctrl\\+D to exit")
    child.send("\x04")
    child.expect(pexpect.EOF)


# ---- in-process -----------------------------------------------------------------------------------------
@pytest.fixture
def shell(store, tmp_path):
    with Shell(copy_of(store, tmp_path / "s.mq"), out=io.StringIO(), err=io.StringIO()) as sh:
        yield sh


def outputs(sh: Shell) -> tuple[str, str]:
    out, err = sh.out.getvalue(), sh.err.getvalue()
    for stream in (sh.out, sh.err):
        stream.seek(0)
        stream.truncate()
    return out, err


def test_output_modes_maxrows_and_timer(shell):
    assert shell.run_script(".mode csv\nSELECT split, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1;") == 0
    assert outputs(shell) == ("split,n\ntest,8\ntrain,16\n", "")
    shell.run_script(".mode json\nSELECT 1 AS one;\n.mode markdown\nSELECT 1 AS one;\n.mode")
    assert outputs(shell)[0] == '[{"one": 1}]\n| one |\n|----:|\n|   1 |\nmarkdown\n'
    shell.run_script(".mode box\n.maxrows 4\n.timer on\nSELECT sample_id FROM samples ORDER BY 1;")
    out, _ = outputs(shell)
    assert out.count("│         · │") == 3 and "24 rows (4 shown)" in out
    assert re.search(r"^Run Time \(s\): real \d+\.\d{3} user \d+\.\d+ sys \d+\.\d+$", out, re.M)
    shell.run_script("CREATE SET few AS SELECT sample_id FROM samples WHERE sample_id < 2;")
    assert outputs(shell)[0].startswith("set few: 2 samples\n")


def test_dot_commands_show_the_catalog(shell):
    shell.run_script(".layers\n.sets\n.tables\n.functions\n.checkpoints")
    out, err = outputs(shell)
    assert err == "" and all(word in out for word in ("fc1", "hard", "samples", "INFLUENCE", "epoch1"))
    shell.run_script(".help")
    out, _ = outputs(shell)
    assert all(cmd in out for cmd in (".mode", ".maxrows", ".timer", ".read", ".open", ".bail", ".exit"))


def test_errors_print_like_duckdb(shell):
    assert shell.run_statement("SELECT TOPK(3) train FROM INFLUENCE(query=batch(x)) ORDER BY 5") is False
    err = outputs(shell)[1]
    assert err.startswith("Parser Error: syntax error: unexpected '5'; expected ASC or DESC")
    assert err.splitlines()[-1].endswith("^") and "ORDER BY 5" in err
    shell.run_statement("SELECT nope FROM samples")
    assert outputs(shell)[1].startswith('Binder Error: Referenced column "nope" not found')   # not doubled
    shell.run_statement("DESCRIBE nope")     # issue #18: DESCRIBE of what is not a table function is DuckDB's
    assert outputs(shell)[1].startswith("Catalog Error: Table with name nope does not exist")
    shell.run_script(".mode xml\n.nope")
    assert outputs(shell)[1] == ("Error: unknown mode xml; the modes are " + ", ".join(MODES) + "\n"
                                 "Error: unknown command .nope (did you mean .open?); .help lists the commands\n")
    assert error_text(metaql.InvalidInputException("NaN in inputs")) == "Invalid Input Error: NaN in inputs"


def test_bail_read_and_open(shell, store, tmp_path):
    script = "SELECT 1 AS a;\nSELECT nope;\nSELECT 2 AS b;\n"
    shell.bail = True
    assert shell.run_script(script) == 1 and "│ b │" not in outputs(shell)[0]
    assert shell.run_script(".bail off\n" + script) == 1 and "│   b   │" in outputs(shell)[0]
    (tmp_path / "inner.sql").write_text("-- a comment\n.mode csv\nSELECT 3 AS c;\n")
    (tmp_path / "outer.sql").write_text(f".read '{tmp_path / 'inner.sql'}'\nSELECT 4 AS d;\n")
    assert shell.run_script(f".read {tmp_path / 'outer.sql'}") == 0
    assert outputs(shell)[0] == "c\n3\nd\n4\n"
    assert shell.run_script(".read missing.sql") == 1 and "IO Error: cannot read missing.sql" in outputs(shell)[1]

    other = copy_of(store, tmp_path / "other.mq")
    assert shell.run_script(f".open --readonly {other}\nSELECT count(*) AS n FROM samples;") == 0
    assert shell.store_name == other and outputs(shell)[0] == "n\n24\n"
    assert shell.run_script("CREATE SET x AS SELECT 1 AS sample_id;") == 1
    assert "read-only" in outputs(shell)[1]


def test_script_parts_split_statements_and_dot_commands():
    text = "-- setup\n.mode csv\nSELECT 1;SELECT\n  2; -- two\n.timer on\n-- c\nSHOW SETS;\nSELECT 3"
    assert script_parts(text) == [".mode csv", "SELECT 1", "SELECT\n  2", ".timer on", "SHOW SETS", "SELECT 3"]


def test_command_line(store, tmp_path, capsys, monkeypatch):
    path = copy_of(store, tmp_path / "s.mq")
    assert cli.main([path, "--mode", "csv", "-c", "SELECT count(*) AS n FROM samples; SELECT nope; SELECT 5;"]) == 1
    out, err = capsys.readouterr()
    assert out == "n\n24\n" and err.startswith("Binder Error:")
    monkeypatch.setattr(sys, "stdin", io.StringIO(".mode json\nSELECT 7 AS seven;\n.exit 3\nSELECT 8;\n"))
    assert cli.main([path]) == 3
    assert capsys.readouterr().out == '[{"seven": 7}]\n'
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and all(s in out for s in ("-c STATEMENTS", "--mode", "metaql demo", ".read FILE"))


def test_progress_bars_stay_off_when_stderr_is_no_terminal(shell):
    assert shell.con.progress(range(3), total=3, desc="x") == range(3)


# ---- completion and highlighting ------------------------------------------------------------------------
def completions(sh: Shell, text: str) -> list[str]:
    found = MetaQLCompleter(sh).get_completions(Document(text), CompleteEvent(completion_requested=True))
    return [c.text for c in found]


def test_completion_by_position(shell):
    assert completions(shell, "SHOW LAY") == ["LAYERS"]
    assert completions(shell, "show ch") == ["checkpoints"]           # keywords in the case typed
    assert {"INFLUENCE", "SELF_INFLUENCE", "samples", "sets"} <= set(completions(shell, "SELECT * FROM "))
    assert completions(shell, "SELECT TOPK(3) train FROM INFLUENCE(layers=[") == ["fc1", "fc2"]
    assert completions(shell, "SELECT * FROM SELF_INFLUENCE(layers=[fc1, f") == ["fc1", "fc2"]
    assert completions(shell, "SELECT TOPK(3) train FROM INFLUENCE(layers=*, query=batch(") == ["hard", "test", "train"]
    assert completions(shell, "SELECT TOPK(3) ") == ["hard", "test", "train"]
    assert completions(shell, "SELECT * FROM INFLUENCE(")[:4] == ["query=", "layers=", "train=", "checkpoints="]
    assert completions(shell, "SELECT * FROM INFLUENCE(layers=*, q") == ["query="]
    assert completions(shell, "SELECT * FROM INFLUENCE(layers=*, query=") == ["batch(", "each(", "point("]
    assert completions(shell, "SELECT * FROM INFLUENCE(layers=*, similarity=") == ["dot", "cosine"]
    assert completions(shell, "SELECT * FROM INFLUENCE(checkpoints=") == ["epoch1", "all", "first", "last"]
    assert completions(shell, "SELECT sa") == ["sample_id"]
    assert completions(shell, "SELECT split, l") == ["label", "loss"]
    assert completions(shell, "SELECT * FROM samples WHERE sp") == ["split"]
    assert {"INFLUENCE", "SELF_INFLUENCE"} <= set(completions(shell, "DESCRIBE "))
    assert completions(shell, "DESCRIBE SELF") == ["SELF_INFLUENCE"]
    assert completions(shell, "DROP SET ") == ["hard"]
    assert completions(shell, "SELECT 1; SHOW SE") == ["SETS"]


def test_completion_of_arguments_follows_their_type_hints(shell):
    def pick(ctx, data: SetName, how: Literal["fast", "exact"] = "fast", above: float = 0.0):
        return {"sample_id": ctx.store.set_ids(data)}
    shell.con.register_function(pick)
    assert completions(shell, "SELECT * FROM pick(") == ["data=", "how=", "above="]
    assert completions(shell, "SELECT * FROM pick(data=") == ["hard", "test", "train"]
    assert completions(shell, "SELECT * FROM pick(data=hard, how=") == ["fast", "exact"]
    assert completions(shell, "SELECT * FROM pick(data=hard, above=") == []


def test_completion_of_dot_commands(shell, tmp_path):
    assert completions(shell, ".la") == [".layers"]
    assert completions(shell, ".mode m") == ["markdown"]
    assert completions(shell, ".bail o") == ["on", "off"]
    assert completions(shell, ".open --r") == ["--readonly"]
    assert completions(shell, ". x") == []
    (tmp_path / "queries.sql").write_text("")
    assert completions(shell, f".read {tmp_path}/quer") == ["ies.sql"]


def test_highlighting_knows_metaqls_words():
    tokens = [(t, v) for _, t, v in MetaQLLexer().get_tokens_unprocessed(
        "SELECT TOPK(5) train FROM INFLUENCE(layers=[fc1], query=batch(test)); SHOW LAYERS") if v.strip()]
    assert (Keyword, "TOPK") in tokens
    assert (Name.Function, "INFLUENCE") in tokens and (Name.Function, "batch") in tokens
    assert (Keyword, "LAYERS") in tokens and (Name, "layers") in tokens
    assert list(MetaQLLexer().get_tokens_unprocessed(".mode csv")) == [(0, Keyword.Pseudo, ".mode csv")]
