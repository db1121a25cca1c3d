"""The web page's endpoints through Starlette's TestClient (no browser, no server process): status
codes, what each write puts in `labels`/`annotations`, read-only refusals, escaping, the token,
and metaql.plot. The browser tests are tests/test_web_browser.py (marker `browser`)."""
from __future__ import annotations

import re
import struct
import time
import zlib

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("matplotlib")
from starlette.testclient import TestClient  # noqa: E402

import metaql  # noqa: E402
import metaql.errors  # noqa: E402
from metaql.errors import InvalidInputException  # noqa: E402
from metaql.web import create_app, serve  # noqa: E402
from metaql.web.rounds import record_round, recorded_rounds  # noqa: E402
from tests import webstore  # noqa: E402

WHO = "ana"
LOCAL = "http://127.0.0.1:8765"      # the Host a browser sends to `metaql serve`


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("web") / "store.mq")
    data = webstore.build(path)
    return path, data


@pytest.fixture(scope="module")
def client(store):
    with TestClient(create_app(store[0], user=WHO), base_url=LOCAL) as c:
        yield c


@pytest.fixture(scope="module")
def ro_client(store, client):
    with TestClient(create_app(store[0], readonly=True), base_url=LOCAL) as c:
        yield c


def labels(client) -> dict[int, dict]:
    return {r["sample_id"]: r for r in client.get("/api/labels").json()["labels"]}


def annotations(client, sample_id: int) -> list:
    con = client.app.state.server.con
    return con.execute("SELECT label, annotated_by FROM annotations WHERE sample_id = ?", [sample_id]).fetchall()


def decode_png(body: bytes) -> np.ndarray:
    """A grey 8-bit PNG as written by metaql.web.images (filter 0 on every row)."""
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(body):
        n, kind = struct.unpack(">I4s", body[pos:pos + 8])
        chunks.setdefault(kind, b"")
        chunks[kind] += body[pos + 8:pos + 8 + n]
        pos += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 0)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, w + 1)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:]


def test_pages_load(client):
    assert client.get("/", follow_redirects=False).status_code == 303
    for url in ("/query", "/review", "/session", "/static/app.js", "/static/app.css"):
        assert client.get(url).status_code == 200, url
    assert client.get("/nope").status_code == 404


def test_thumbnail_is_the_stored_input(client, store):
    x = store[1]["x"][7].reshape(8, 8)
    img = decode_png(client.get("/thumb/7.png?scale=2").content)
    assert img.shape == (16, 16)
    expected = np.round((1 - (x - x.min()) / (x.max() - x.min())) * 255)
    assert np.array_equal(img[::2, ::2], expected.astype(np.uint8))
    assert client.get("/thumb/7.png?scale=99").status_code == 400
    missing = client.get("/thumb/123456.png")
    assert missing.status_code == 404 and "not registered samples" in missing.text    # not "no registered inputs"


def test_query_console_runs_sorts_and_pages(client):
    r = client.post("/query", data={"q": "SELECT sample_id, loss AS score FROM samples", "cols": "label,note"})
    assert r.status_code == 200 and "page 1 of 4" in r.text         # 80 rows, 25 a page
    rid = re.search(r"rid=(\d+)", str(r.url)).group(1)
    page = client.get(f"/query?rid={rid}&sort=score&desc=1&cols=label")
    con = client.app.state.server.con
    top = con.execute("SELECT sample_id FROM samples ORDER BY loss DESC LIMIT 1").fetchone()[0]
    first_row = re.search(r"<tbody>\s*<tr>(.*?)</tr>", page.text, re.S).group(1)
    assert f'src="/thumb/{top}.png' in first_row
    last = client.get(f"/query?rid={rid}&page=3")
    assert last.status_code == 200 and last.text.count('class="thumb"') == 5
    assert client.get(f"/query?rid={rid}&page=4").status_code == 400
    assert client.get(f"/query?rid={rid}&sort=nope").status_code == 400
    assert client.get("/query?rid=999999").status_code == 404
    hist = client.get(f"/plot/hist.png?rid={rid}&page=0")
    assert hist.status_code == 200 and hist.headers["content-type"] == "image/png"
    assert client.post("/query", data={"q": "SELECT * FROM no_such_table"}).status_code == 400
    plain = client.post("/query", data={"q": "SELECT 1 AS one"})
    plain_rid = re.search(r"rid=(\d+)", str(plain.url)).group(1)
    assert client.get(f"/plot/hist.png?rid={plain_rid}").status_code == 404


def test_values_are_escaped(client):
    r = client.post("/query", data={"q": "SELECT sample_id, note FROM samples WHERE sample_id = 3",
                                    "cols": "note"})
    assert webstore.INJECTION not in r.text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in r.text
    bad = client.post("/query", data={"q": "SELECT '<img src=x onerror=alert(1)>' AS x FROM nope"})
    assert bad.status_code == 400 and "<img src=x" not in bad.text
    assert client.get("/review?train=<b>").status_code == 400
    ids = [int(i) for i in re.findall(r'data-sample="(\d+)"', client.get("/review?k=12").text)]
    evil = "<img src=x onerror=alert(1)>"
    r = client.post("/api/review/decide", json={"sample_id": ids[11], "verdict": "correct", "who": evil})
    assert r.status_code == 200 and r.json()["labeled_by"] == evil
    page = client.get("/review?k=12").text
    assert evil not in page and "by &lt;img src=x onerror=alert(1)&gt;" in page
    assert "<b>" not in client.get("/review?train=<b>").text.split("<main>")[1]


def test_review_decide_undo_never_overwrites(client, store):
    given = store[1]["given"]
    page = client.get("/review?k=10")
    assert page.status_code == 200 and "no decision yet" in page.text
    ids = [int(i) for i in re.findall(r'data-sample="(\d+)"', page.text)]
    ranking = client.app.state.server.con.execute(
        "SELECT TOPK(10) train FROM SELF_INFLUENCE(layers=*) ORDER BY DESC").fetchall()
    assert ids == [r[0] for r in ranking]
    a, b, c = ids[:3]
    wrong = (int(given[a]) + 3) % 10
    r = client.post("/api/review/decide", json={"sample_id": a, "verdict": "mislabeled", "label": wrong, "who": WHO})
    assert r.status_code == 200 and r.json()["label"] == wrong and r.json()["labeled_by"] == WHO
    assert client.post("/api/review/decide", json={"sample_id": b, "verdict": "correct", "who": WHO}).json()["label"] == int(given[b])
    # a second decision on a decided sample is refused, the first kept
    again = client.post("/api/review/decide", json={"sample_id": a, "verdict": "correct", "who": WHO})
    assert again.status_code == 409 and "undo" in again.json()["error"]
    assert labels(client)[a]["label"] == wrong
    assert annotations(client, a) == [(wrong, WHO)]
    same = client.post("/api/review/decide", json={"sample_id": c, "verdict": "mislabeled", "label": int(given[c]), "who": WHO})
    assert same.status_code == 400
    page = client.get("/review?k=10")
    assert "1/2 = 0.500" in page.text
    # undo: only one's own decision, exactly the rows it wrote
    assert client.post("/api/review/undo", json={"sample_id": a, "who": "bob"}).status_code == 403
    r = client.post("/api/review/undo", json={"sample_id": a, "who": WHO})
    assert r.status_code == 200, r.text
    assert a not in labels(client) and annotations(client, a) == []
    assert client.post("/api/review/undo", json={"sample_id": a, "who": WHO}).status_code == 404
    assert b in labels(client)


@pytest.mark.parametrize("body, status", [
    ({"sample_id": 1, "verdict": "maybe", "who": WHO}, 400),
    ({"sample_id": "x", "verdict": "correct", "who": WHO}, 400),
    ({"sample_id": 1, "verdict": "mislabeled", "label": 2.5, "who": WHO}, 400),
    ({"sample_id": 1, "verdict": "correct", "who": ""}, 400),
    ({"sample_id": 99999, "verdict": "correct", "who": WHO}, 404),
])
def test_decide_refuses_bad_input(client, body, status):
    r = client.post("/api/review/decide", json=body)
    assert r.status_code == status and r.json()["error"]


def test_influential_samples_match_the_influence_query(client):
    got = client.get("/api/influential/5?n=3").json()["influential"]
    con = client.app.state.server.con
    rows = con.execute("SELECT TOPK(4) train FROM INFLUENCE(layers=*, query=point(5)) ORDER BY DESC").fetchall()
    expected = [r for r in rows if r[0] != 5][:3]
    assert [r["sample_id"] for r in got] == [r[0] for r in expected]
    assert np.allclose([r["score"] for r in got], [r[1] for r in expected])
    assert client.get("/api/influential/5").json()["influential"] == got     # the cards' three by default


def test_writes_must_be_same_origin_json(client):
    body = {"sample_id": 9, "verdict": "correct", "who": WHO}
    assert client.post("/api/review/decide", json=body, headers={"origin": "http://evil.example"}).status_code == 403
    assert client.post("/api/review/decide", data={"sample_id": "9"}).status_code == 415
    assert client.post("/query", data={"q": "DROP SET x"}, headers={"origin": "http://evil.example"}).status_code == 403
    assert 9 not in labels(client)


def test_readonly_refuses_every_write(ro_client, client):
    before = labels(client)
    for url, body in [("/api/review/decide", {"sample_id": 9, "verdict": "correct", "who": WHO}),
                      ("/api/review/undo", {"sample_id": 9, "who": WHO}),
                      ("/api/label", {"sample_id": 9, "label": 1, "who": WHO}),
                      ("/api/session/pool", {"name": "p_ro", "split": "train"}),
                      ("/api/session/round", {"pool": "p_ro"}),
                      ("/api/jobs/1/cancel", {}),
                      ("/api/session/candidates", {"method": "active", "pool": "train"}),
                      ("/api/annotate", {"sample_id": 9, "label": 1, "who": WHO})]:
        r = ro_client.post(url, json=body)
        assert r.status_code == 403 and "--readonly" in r.json()["error"], url
    r = ro_client.post("/query", data={"q": "CREATE SET p_ro AS SELECT sample_id FROM samples"})
    assert r.status_code == 400 and "read-only" in r.text
    for url in ("/query", "/review", "/session"):
        page = ro_client.get(url)
        assert page.status_code == 200 and "read-only" in page.text
    assert labels(client) == before
    assert "p_ro" not in client.app.state.server.con.store.set_names()


def test_labeling_session_round(client, store):
    """A first round (no label yet: LANCET's random start, no training), labels by the number
    keys' endpoint, then a trained round cancelled from its progress. A full trained round (stop
    rule, accuracy, curve) runs in the browser test: its DMN alone takes seconds."""
    true = store[1]["true"]
    assert client.post("/api/session/pool", json={"name": "pool", "split": "test"}).json()["size"] == 20
    assert client.post("/api/session/pool", json={"name": "pool", "split": "train"}).status_code == 409
    assert client.post("/api/session/pool", json={"name": "x;DROP", "split": "train"}).status_code == 400
    assert "No round recorded" in client.get("/session?pool=pool").text
    job = client.post("/api/session/round", json={"pool": "pool", "budget": 4, "steps": 3, "num_classes": 10,
                                                  "truth": "true_label"}).json()
    state = _wait(client, job["id"])
    assert state["state"] == "done" and "random" in " ".join(state["warnings"]), state
    page = client.get("/session?pool=pool")
    cards = [int(i) for i in re.findall(r'data-sample="(\d+)"', page.text)]
    assert len(cards) == 4 and "random start" in page.text
    # the random start is a recorded round with no label, so no point of the curve
    assert recorded_rounds(client.app.state.server.con, "pool")[0]["n_labeled"] == 0
    for i in cards:
        assert client.post("/api/label", json={"sample_id": i, "label": int(true[i]), "who": WHO}).status_code == 200
    assert client.post("/api/label", json={"sample_id": cards[0], "label": (int(true[cards[0]]) + 1) % 10,
                                           "who": WHO}).status_code == 409
    assert len(re.findall(rf"label \d by {WHO}<", client.get("/session?pool=pool").text)) == 4
    assert client.get("/plot/lancet.png?pool=pool").status_code == 404       # no round with labels yet
    assert client.get("/session?pool=nope").status_code == 404
    assert client.post("/api/session/round", json={"pool": "pool", "truth": "nope"}).status_code == 400
    assert client.get("/api/jobs/424242").status_code == 404


def test_a_round_is_cancelled(client):
    job = client.post("/api/session/round", json={"pool": "pool", "budget": 4, "steps": 20000,
                                                  "num_classes": 10}).json()
    assert client.post("/api/session/round", json={"pool": "pool"}).status_code == 409
    deadline = time.time() + 60
    while client.get(f"/api/jobs/{job['id']}").json()["done"] < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert client.post(f"/api/jobs/{job['id']}/cancel", json={}).status_code == 200
    state = _wait(client, job["id"])
    assert state["state"] == "cancelled" and state["done"] < 20000
    assert len(recorded_rounds(client.app.state.server.con, "pool")) == 1   # the cancelled round left nothing


def _wait(client, job_id: int, seconds: float = 120) -> dict:
    deadline = time.time() + seconds
    while time.time() < deadline:
        state = client.get(f"/api/jobs/{job_id}").json()
        if state["state"] != "running":
            return state
        time.sleep(0.1)
    raise AssertionError("the round did not finish")


def test_token_is_required_when_set(store, client):
    with TestClient(create_app(store[0], readonly=True, token="s3cret"), base_url=LOCAL) as c:
        assert c.get("/query").status_code == 401
        assert c.get("/query?token=wrong").status_code == 401
        first = c.get("/query?token=s3cret")
        assert first.status_code == 200 and "metaql_token" in first.headers["set-cookie"]
        assert c.get("/review?k=2").status_code == 200                       # the cookie now
        c.cookies.clear()
        assert c.get("/query").status_code == 401
        assert c.get("/query", headers={"authorization": "Bearer s3cret"}).status_code == 200
    with TestClient(create_app(store[0], readonly=True, token="n3w"), base_url=LOCAL) as c:
        c.cookies.set("metaql_token", "s3cret")                  # left by the server's previous run
        fresh = c.get("/query?token=n3w")
        assert fresh.status_code == 200 and "metaql_token=n3w" in fresh.headers["set-cookie"]


def test_requests_for_another_host_name_are_refused(store):
    """DNS rebinding: a page on evil.example re-points its name at 127.0.0.1; its requests carry
    its own name as Host and a matching Origin, and must reach nothing."""
    with TestClient(create_app(store[0], readonly=True), base_url="http://evil.example:8765") as c:
        origin = {"origin": "http://evil.example:8765"}
        assert c.get("/query").status_code == 400
        assert c.post("/api/label", json={"sample_id": 1, "label": 3}, headers=origin).status_code == 400
        assert c.post("/query", data={"q": "SELECT 1"}, headers=origin).status_code == 400
    with TestClient(create_app(store[0], readonly=True, host="10.1.2.3", token="t"),
                    base_url="http://10.1.2.3:8765") as c:
        assert c.get("/query?token=t").status_code == 200         # the address it was bound to


@pytest.mark.parametrize("sql", ["SELECT * FROM read_text('{outside}/secret.txt')",
                                 "COPY (SELECT 42 AS x) TO '{outside}/written.csv'",
                                 "SELECT * FROM read_csv('{outside}/secret.txt')"])
def test_console_sql_touches_no_file_outside_the_store(ro_client, client, tmp_path, sql):
    (tmp_path / "secret.txt").write_text("top secret")
    for c in (ro_client, client):
        page = c.post("/query", data={"q": sql.format(outside=tmp_path)})
        assert page.status_code == 400 and "top secret" not in page.text
        assert "disabled" in page.text or "Permission" in page.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"]
    assert client.post("/query", data={"q": "SELECT count(*) AS n FROM samples"},
                       follow_redirects=False).status_code == 303


def test_serve_refuses_a_public_address_without_token(store):
    with pytest.raises(InvalidInputException, match="--token"):
        serve(store[0], host="0.0.0.0")
    with pytest.raises(InvalidInputException, match="no store"):
        serve("/nonexistent/store.mq")


def test_cli_serve_reports_errors(capsys):
    from metaql.cli import main
    assert main(["serve", "/nonexistent/store.mq"]) == 1
    assert "no store" in capsys.readouterr().err


def test_plots():
    from metaql import plot
    scores = np.arange(100.0)
    fig = plot.score_histogram(scores, marked=[3.0, 50.0])
    ax = fig.axes[0]
    assert sum(p.get_height() for p in ax.patches) == 100 and len(ax.lines) == 2
    curve = plot.lancet_curve([10, 20, 30], [0.5, 0.7, 0.8])
    assert list(curve.axes[0].lines[0].get_ydata()) == [0.5, 0.7, 0.8]
    history = [{"epoch": 0, "step": s, "val_loss": 1 / (s + 1), "train_loss": 2 / (s + 1), "anomalous": 0.1}
               for s in range(5)]
    assert len(plot.elite_curve(history).axes[0].lines) == 2
    grid = plot.image_grid([np.eye(4)] * 5, titles=list("abcde"), ncols=2)
    assert len(grid.axes) == 5
    assert plot.png_bytes(grid)[:4] == b"\x89PNG"
    with pytest.raises(InvalidInputException):
        plot.lancet_curve([1, 2], [0.5])
    with pytest.raises(InvalidInputException):
        plot.elite_curve([])
    with pytest.raises(InvalidInputException, match="numbers"):
        plot.score_histogram(["a", "b"])


def test_plots_leave_the_users_matplotlib_backend_alone():
    import matplotlib
    from metaql import plot
    before = matplotlib.get_backend()
    matplotlib.use("svg")          # e.g. a notebook's own choice
    try:
        assert plot.png_bytes(plot.score_histogram([1.0, 2.0, 3.0]))[:4] == b"\x89PNG"
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_a_column_asked_for_twice_is_shown(client):
    r = client.post("/query", data={"q": "SELECT sample_id, loss AS score FROM samples", "cols": "label"},
                    follow_redirects=False)
    rid = re.search(r"rid=(\d+)", r.headers["location"]).group(1)
    assert client.get(f"/query?rid={rid}&cols=note,note,label").status_code == 200


def test_topk_grid_and_relation_plot(client):
    from metaql import plot
    con = client.app.state.server.con
    rel = con.sql("SELECT TOPK(6) train FROM SELF_INFLUENCE(layers=*) ORDER BY DESC")
    fig = plot.topk_grid(con, rel, ncols=3)
    assert len(fig.axes) == 6
    ids = rel.arrow().column("sample_id").to_pylist()
    assert fig.axes[0].get_title().startswith(f"{ids[0]}:")
    hist = rel.plot()
    assert sum(p.get_height() for p in hist.axes[0].patches) == 6


def test_withdraw_label_removes_only_ones_own_newest_decision(tmp_path):
    from metaql.storage.labels import withdraw_label
    path = str(tmp_path / "s.mq")
    con = metaql.connect(path)
    con.add_samples(np.arange(3), "train", np.zeros(3, dtype=np.int64))
    con.label([0, 1], [2, 2], by="ana")
    con.annotate([0, 0, 0], [2, 5, 2], by="ana")
    con.annotate([0], [2], by="bob")
    assert withdraw_label(con.store, 0, "ana")
    assert con.execute("SELECT count(*) FROM labels WHERE sample_id = 0").fetchone()[0] == 0
    # the newest of ana's two annotations with label 2 went; her 5 and bob's 2 stay
    left = con.execute("SELECT label, annotated_by FROM annotations ORDER BY annotated_by, label").fetchall()
    assert left == [(2, "ana"), (5, "ana"), (2, "bob")]
    assert not withdraw_label(con.store, 2, "ana")
    with pytest.raises(InvalidInputException, match="labeled by ana"):
        withdraw_label(con.store, 1, "bob")
    con.close()
    ro = metaql.connect(path, read_only=True)
    with pytest.raises(metaql.errors.IOException):
        withdraw_label(ro.store, 1, "ana")
    ro.close()


def test_active_learning_session(client):
    """Candidates from ACTIVE_LEARNING_CANDIDATES, one labeled by the number keys' endpoint, the
    status row counting it (the same proposal, one fewer pending)."""
    assert client.post("/api/session/pool", json={"name": "al_pool", "split": "test"}).status_code == 200
    assert "ACTIVE_LEARNING_CANDIDATES" in client.get("/session?pool=al_pool&method=active").text
    r = _candidates(client, {"method": "active", "pool": "al_pool", "k": 3})
    ids = [c["sample_id"] for c in r["candidates"]]
    assert len(ids) == 3 and all(60 <= i < 80 for i in ids)
    first = r["status"]              # the LANCET test above labeled some of this split already
    assert first["pending"] == 3 and first["cycles"] == 1 and first["n_labeled"] + first["n_unlabeled"] == 20
    assert client.post("/api/label", json={"sample_id": ids[0], "label": 4, "who": WHO}).status_code == 200
    assert labels(client)[ids[0]]["label"] == 4 and labels(client)[ids[0]]["labeled_by"] == WHO
    status = client.get("/api/session/status?method=active&pool=al_pool").json()["status"]
    assert (status["n_labeled"], status["n_unlabeled"], status["pending"], status["cycles"]) == \
        (first["n_labeled"] + 1, first["n_unlabeled"] - 1, 2, 1)
    page = client.get("/session?pool=al_pool&method=active").text
    assert re.findall(r'data-sample="(\d+)"', page) == [str(i) for i in ids] and f"label 4 by {WHO}" in page
    again = _candidates(client, {"method": "active", "pool": "al_pool", "k": 3}, replayed=False)
    assert [c["sample_id"] for c in again["candidates"]] == ids[1:] and again["status"]["cycles"] == 1


def test_label_cleaning_session(client):
    """Candidates from LABEL_CLEANING_CANDIDATES, one annotated (appended, never replacing), the
    status row counting it; the annotation's label is bounded by the classes."""
    assert client.post("/api/session/pool", json={"name": "lc_data", "split": "train"}).status_code == 200
    page = client.get("/session?pool=lc_data&method=cleaning")
    assert page.status_code == 200 and "no label-cleaning session" in page.text
    r = _candidates(client, {"method": "cleaning", "pool": "lc_data", "k": 2, "budget": 5, "update_every": 2})
    ids = [c["sample_id"] for c in r["candidates"]]
    assert len(ids) == 2 and r["status"]["budget_left"] == 5
    before = annotations(client, ids[0])
    for _ in range(2):
        assert client.post("/api/annotate", json={"sample_id": ids[0], "label": 3, "who": WHO}).status_code == 200
    assert annotations(client, ids[0]) == before + [(3, WHO), (3, WHO)]
    assert client.post("/api/annotate", json={"sample_id": ids[0], "label": 10, "who": WHO}).status_code == 400
    status = client.get("/api/session/status?method=cleaning&pool=lc_data").json()["status"]
    assert (status["spent"], status["budget_left"], status["since_update"], status["update_due"]) == (2, 3, 2, True)
    assert "update_due" in client.get("/session?pool=lc_data&method=cleaning").text
    assert client.post("/api/session/candidates", json={"method": "nope", "pool": "lc_data"}).status_code == 400
    assert client.get("/session?pool=lc_data&method=nope").status_code == 400


def _candidates(client, body: dict, replayed: bool = True) -> dict:
    """The next candidates, asked for as the page does: a job, polled until done; its result.
    replayed: the candidates were scored (not a pending proposal given again)."""
    r = client.post("/api/session/candidates", json=body)
    assert r.status_code == 200, r.text
    state = _wait(client, r.json()["id"])
    assert state["state"] == "done", state
    if replayed:             # the scoring's batches were counted
        assert state["total"] and state["done"] == state["total"], state
    return state["result"]


@pytest.mark.parametrize("method, pool, split, args", [
    ("active", "al_cancel", "test", "k=3"),
    ("cleaning", "lc_cancel", "test", "k=2, budget=5, update_every=2")])
def test_next_candidates_are_cancelled(client, method, pool, split, args):
    """A cancel reaches the candidates' statement even when it comes before the statement began (the
    cursor's own interrupt is cleared then): it stops at the scoring's first batch, and the session
    counts no cycle (active learning) or is not begun (label cleaning)."""
    import threading
    from metaql.web.app import METHOD_SQL
    assert client.post("/api/session/pool", json={"name": pool, "split": split}).status_code == 200
    server, go = client.app.state.server, threading.Event()
    arg, candidates_fn, _ = METHOD_SQL[method]

    def work(cur):
        go.wait(30)
        return cur.execute(f"SELECT * FROM {candidates_fn}({arg}={pool}, {args})").fetchall()
    job = server.jobs.start(method, pool, work)
    assert client.post("/api/session/candidates", json={"method": method, "pool": pool}).status_code == 409
    assert client.post(f"/api/jobs/{job['id']}/cancel", json={}).json()["state"] == "running"
    go.set()
    state = _wait(client, job["id"])
    assert state["state"] == "cancelled" and state["done"] == 0, state
    status = client.get(f"/api/session/status?method={method}&pool={pool}").json()
    if method == "active":
        assert (status["status"]["cycles"], status["status"]["pending"]) == (0, 0)
    else:
        assert status["status"] is None and "no label-cleaning session" in status["note"]
    assert (method, pool) not in server.proposals


def test_rounds_are_kept_in_the_store(client, ro_client):
    """A round is a row of lancet_rounds: another server on the store (here a read-only one, as
    after a restart) shows the last round's candidates and the curve, and metaql.plot draws it."""
    from metaql import plot
    from metaql.labeling.lancet_functions import STATUS_COLUMNS
    server = client.app.state.server
    status = dict({name: None for name, _ in STATUS_COLUMNS}, should_stop=False, reason="go on")
    assert client.post("/api/session/pool", json={"name": "kept", "split": "test"}).status_code == 200
    for n, accuracy, confidence in ((4, 0.5, 0.6), (8, 0.75, 0.7)):
        rows = [{"sample_id": 60 + n + j, "weight": 0.1 * j, "confidence": 0.5} for j in range(3)]
        round_ = {"candidates": rows, "n_labeled": n, "accuracy": accuracy, "confidence": confidence,
                  "truth": "true_label", "status": status}
        record_round(server.con.store, "kept", round_, {"budget": 3, "steps": 5, "num_classes": 10}, WHO)
    rounds = recorded_rounds(ro_client.app.state.server.con, "kept")
    assert [(r["round"], r["n_labeled"], r["accuracy"], r["run_by"]) for r in rounds] == \
        [(1, 4, 0.5, WHO), (2, 8, 0.75, WHO)]
    page = ro_client.get("/session?pool=kept").text
    assert re.findall(r'data-sample="(\d+)"', page) == ["68", "69", "70"] and "round 2" in page
    assert "go on" in page and 'id="curve"' in page
    png = ro_client.get("/plot/lancet.png?pool=kept")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    ro = metaql.connect(client.app.state.server.con.store.root, read_only=True)
    try:
        line = plot.lancet_curve(ro, "kept").axes[0].lines[0]
        assert line.get_xdata().tolist() == [4, 8] and line.get_ydata().tolist() == [0.5, 0.75]
        with pytest.raises(InvalidInputException, match="no LANCET round"):
            plot.lancet_curve(ro, "nope")
    finally:
        ro.close()


def test_review_ranks_with_any_topk_statement(client):
    """A TOPK statement posted to the review page runs once; its cards are its rows in order (the
    same statement run on a connection); other statements and rankings are refused with a reason."""
    q = "SELECT TOPK(5) train FROM INFLUENCE(layers=*, query=point(65)) ORDER BY ASC"
    r = client.post("/review", data={"q": q}, follow_redirects=False)
    assert r.status_code == 303 and "rid=" in r.headers["location"]
    page = client.get(r.headers["location"]).text
    expected = client.app.state.server.con.execute(q).fetchall()
    assert [int(i) for i in re.findall(r'data-sample="(\d+)"', page)] == [i for i, _ in expected]
    assert "5 sample(s) ranked by" in page and "point(65)" in page
    for bad, why in (("SELECT * FROM samples", "one TOPK statement"),
                     (q + "; " + q, "one TOPK statement"),
                     ("", "write a TOPK statement"),
                     (q.replace("TOPK(5)", "TOPK(501)"), "at most 500"),
                     ("SELECT TOPK(3) FROM LANCET_CANDIDATES(pool=pool) ORDER BY DESC", "score")):
        r = client.post("/review", data={"q": bad})
        assert r.status_code == 400 and why in r.text, (bad, r.text[-400:])
    assert client.post("/review", data={"q": q}, headers={"origin": "http://evil.example"}).status_code == 403
    # a console result: reviewable when it is a TOPK ranking, refused by rid otherwise
    rid = client.post("/query", data={"q": q}, follow_redirects=False).headers["location"]
    assert 'id="review-these"' in client.get(rid).text
    other = client.post("/query", data={"q": "SELECT sample_id, loss AS score FROM samples LIMIT 3"},
                        follow_redirects=False).headers["location"]
    assert 'id="review-these"' not in client.get(other).text
    r = client.get("/review?rid=" + re.search(r"rid=(\d+)", other).group(1))
    assert r.status_code == 400 and "one TOPK statement" in r.text
