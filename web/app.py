"""`metaql serve STORE`: the web page for the human in the loop (Starlette, server-rendered).

Pages: Query (a MetaQL console; results with thumbnails, sorting, paging and a score histogram),
Review (the mislabel ranking as a grid; one key per decision, written to `labels` and
`annotations` with who and when), Labeling (a LANCET session: candidates, number keys, the stop
rule, the accuracy-vs-labels curve, rounds run in the background with progress and cancel; or an
active-learning / label-cleaning session: their candidates, number keys writing labels or
annotations, their status row).

Safety: every value reaches the page through Jinja's autoescaping or the DOM's textContent;
writes are POSTs with a JSON body (a cross-site form cannot send one) or, for the console, a form
whose Origin must be this server's; --readonly opens the store read-only and answers every write
endpoint 403; a token, when set, is required on every request (query parameter once, then a
cookie; or an Authorization: Bearer header).
"""
from __future__ import annotations

import getpass
import hmac
import itertools
import re
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode, urlsplit

import numpy as np
import pyarrow as pa

import metaql
from metaql.errors import Error, InvalidInputException
from metaql.storage.labels import withdraw_label
from metaql.web.images import image_of, png
from metaql.web.jobs import Busy, Jobs, public
from metaql.web.rounds import curve_points, record_round, recorded_rounds

HERE = Path(__file__).parent
PAGE_ROWS = 25
MAX_K = 500
MAX_BUDGET = 1000
MAX_STEPS = 20_000
RESULTS_KEPT = 16
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
MISLABEL_QUERY = "SELECT TOPK({k}) {train} FROM SELF_INFLUENCE(layers=*) ORDER BY DESC"
METHODS = {"lancet": "LANCET", "active": "active learning", "cleaning": "label cleaning"}
# what each session's table functions are called with: the set's argument name, the candidates' and
# the status' functions (metaql.active.session_functions)
METHOD_SQL = {"active": ("pool", "ACTIVE_LEARNING_CANDIDATES", "ACTIVE_LEARNING_STATUS"),
              "cleaning": ("data", "LABEL_CLEANING_CANDIDATES", "LABEL_CLEANING_STATUS")}
HARMFUL_QUERY = "SELECT TOPK({k}) {train} FROM INFLUENCE(layers=*, query=batch({set})) ORDER BY ASC"


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Server:
    """The state behind the pages: one connection (used under a lock), the console's recent
    results, the labeling sessions' rounds, and the background jobs."""

    def __init__(self, store: str, readonly: bool = False, token: str | None = None, user: str | None = None):
        self.con = metaql.connect(store, read_only=readonly, config={"progress": False})
        # the console's SQL comes over the network: DuckDB must not read or write the host's files
        self.con.store.confine_files()
        self.readonly, self.token = readonly, token or None
        self.user = user or _default_user()
        self.lock = threading.RLock()
        self.results: OrderedDict[int, tuple[str, pa.Table]] = OrderedDict()
        self.proposals: dict[tuple[str, str], list[dict]] = {}     # (method, set) -> the last candidates
        self.jobs = Jobs(self.con)
        self._ids = itertools.count(1)
        self.closed = False

    def sql(self, text: str, params: Any = None) -> pa.Table:
        with self.lock:
            return self.con.execute(text, params).arrow()

    def keep_result(self, query: str, table: pa.Table) -> int:
        rid = next(self._ids)
        self.results[rid] = (query, table)
        while len(self.results) > RESULTS_KEPT:
            self.results.popitem(last=False)
        return rid

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.jobs.close()
        self.con.close()


def _default_user() -> str:
    try:
        return getpass.getuser()
    except Exception:       # no login name in a container: a neutral one
        return "web"


# -- the request plumbing -------------------------------------------------------------------------------
def create_app(store: str, readonly: bool = False, token: str | None = None, user: str | None = None,
               host: str = "127.0.0.1"):
    """The Starlette application over `store` (a directory; opened read-only with readonly). Requests
    must name `host` or a loopback name in their Host header: a page elsewhere whose name was
    re-pointed at 127.0.0.1 (DNS rebinding) sends its own name and is refused."""
    from jinja2 import Environment, FileSystemLoader
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    server = Server(store, readonly, token, user)
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=True)
    env.globals.update(readonly=readonly, user=server.user, urlencode=urlencode)
    pages = Pages(server, env)
    routes = [Route("/", pages.home), Route("/query", pages.query, methods=["GET", "POST"]),
              Route("/review", pages.review, methods=["GET", "POST"]), Route("/session", pages.session),
              Route("/thumb/{sample_id:int}.png", pages.thumb),
              Route("/plot/hist.png", pages.hist_png), Route("/plot/lancet.png", pages.lancet_png),
              Route("/api/labels", pages.labels_json),
              Route("/api/influential/{sample_id:int}", pages.influential),
              Route("/api/review/decide", pages.decide, methods=["POST"]),
              Route("/api/review/undo", pages.undo, methods=["POST"]),
              Route("/api/label", pages.label, methods=["POST"]),
              Route("/api/session/pool", pages.create_pool, methods=["POST"]),
              Route("/api/session/round", pages.start_round, methods=["POST"]),
              Route("/api/session/candidates", pages.method_candidates, methods=["POST"]),
              Route("/api/session/status", pages.method_status),
              Route("/api/annotate", pages.annotate, methods=["POST"]),
              Route("/api/jobs/{job_id:int}", pages.job),
              Route("/api/jobs/{job_id:int}/cancel", pages.cancel, methods=["POST"]),
              Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")]
    hosts = {h.strip("[]").lower() for h in (*LOOPBACK, host)}
    app = Starlette(routes=routes, middleware=[Middleware(Guard, server=server, hosts=hosts)],
                    lifespan=_closing(server))
    app.state.server = server
    return app


def _closing(server: Server):
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.close()
    return lifespan


class Guard:
    """Token, same-origin writes and JSON bodies, checked before any endpoint runs."""

    def __init__(self, app, server: Server, hosts: set[str]):
        self.app, self.server, self.hosts = app, server, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.requests import Request
        request = Request(scope)
        refusal, set_cookie = self._refusal(request)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if not set_cookie:
            return await self.app(scope, receive, send)

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (b"set-cookie", f"metaql_token={self.server.token}; HttpOnly; SameSite=Strict; Path=/".encode())]
            await send(message)
        return await self.app(scope, receive, send_with_cookie)

    def _refusal(self, request) -> tuple[Any, bool]:
        from starlette.responses import JSONResponse, PlainTextResponse
        name = (urlsplit("//" + request.headers.get("host", "")).hostname or "").lower()
        if name not in self.hosts and not name.startswith("127."):
            return PlainTextResponse(f"this server answers requests for {', '.join(sorted(self.hosts))}, not "
                                     f"'{name}': open the address `metaql serve` printed", status_code=400), False
        token, from_query = self.server.token, False
        if token:
            # a token in the address wins over an older cookie (a restarted server has a new token)
            given = request.query_params.get("token", "")
            from_query = bool(given)
            auth = request.headers.get("authorization", "")
            if not given and auth.lower().startswith("bearer "):
                given = auth[7:]
            given = given or request.cookies.get("metaql_token") or ""
            if not hmac.compare_digest(given.encode(), token.encode()):
                return PlainTextResponse("this server needs its token: open the address `metaql serve` "
                                         "printed (it ends in ?token=...)", status_code=401), False
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("origin")
            if origin and urlsplit(origin).netloc != request.headers.get("host", ""):
                return PlainTextResponse(f"a write from another site ({origin}) is refused",
                                         status_code=403), False
            if request.url.path.startswith("/api/"):
                if self.server.readonly:
                    return JSONResponse({"error": "the server runs with --readonly: nothing is written; "
                                                  "restart it without --readonly to label"}, status_code=403), False
                if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                    return JSONResponse({"error": "send the request body as application/json"},
                                        status_code=415), False
        return None, from_query


def _json_endpoint(fn: Callable) -> Callable:
    """Runs a JSON endpoint: HTTPError and MetaQL errors become {"error": message} answers."""
    import functools

    @functools.wraps(fn)
    async def wrapper(self, request):
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse
        body = None
        if request.method == "POST":
            try:
                body = await request.json()
            except ValueError:
                return JSONResponse({"error": "the request body is not valid JSON"}, status_code=400)
            if not isinstance(body, dict):
                return JSONResponse({"error": "the request body must be a JSON object"}, status_code=400)
        try:
            return JSONResponse(await run_in_threadpool(fn, self, request, body))
        except HTTPError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        except Error as e:
            return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=400)
    return wrapper


def _int(value: Any, what: str, low: int, high: int) -> int:
    try:
        n = int(value)
        if isinstance(value, float) and n != value:
            raise ValueError
    except (TypeError, ValueError):
        raise HTTPError(400, f"{what} must be a whole number, got {value!r}") from None
    if not low <= n <= high:
        raise HTTPError(400, f"{what} must lie in {low}..{high}, got {n}")
    return n


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise HTTPError(400, f"{what} must be a name (letters, digits, _), got {value!r}")
    return value


def _who(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 64:
        raise HTTPError(400, "who must name the person deciding (1 to 64 characters)")
    return value.strip()


# -- the pages ------------------------------------------------------------------------------------------
class Pages:
    def __init__(self, server: Server, env):
        self.s, self.env = server, env

    def _html(self, template: str, status: int = 200, **values):
        from starlette.responses import HTMLResponse
        return HTMLResponse(self.env.get_template(template).render(**values), status_code=status)

    async def home(self, request):
        from starlette.responses import RedirectResponse
        return RedirectResponse("/query", status_code=303)

    # ---- Query -----------------------------------------------------------------------------------------
    async def query(self, request):
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import RedirectResponse
        if request.method == "POST":
            form = await request.form()
            text = str(form.get("q", "")).strip()
            cols = str(form.get("cols", "label,pred"))
            try:
                table = await run_in_threadpool(self.s.sql, text)
            except Error as e:
                return self._html("query.html", 400, q=text, cols=cols, error=f"{type(e).__name__}: {e}", view=None)
            rid = self.s.keep_result(text, table)
            return RedirectResponse("/query?" + urlencode({"rid": rid, "cols": cols}), status_code=303)
        try:
            view = await run_in_threadpool(self._result_view, request.query_params)
        except HTTPError as e:
            return self._html("query.html", e.status, q="", cols="label,pred", error=e.message, view=None)
        return self._html("query.html", q=view["query"] if view else "", cols=request.query_params.get("cols", "label,pred"),
                          error=None, view=view)

    def _result_view(self, params) -> dict | None:
        if "rid" not in params:
            return None
        rid = _int(params["rid"], "rid", 0, 2 ** 62)
        if rid not in self.s.results:
            raise HTTPError(404, "that result is no longer kept: run the statement again")
        query, table = self.s.results[rid]
        ordered, sort, desc = _sorted(table, params.get("sort", ""), params.get("desc", "0") == "1")
        pages = max(1, -(-ordered.num_rows // PAGE_ROWS))
        page = _int(params.get("page", 0), "page", 0, pages - 1)
        shown = ordered.slice(page * PAGE_ROWS, PAGE_ROWS)
        columns, rows = list(shown.column_names), [[_cell(v) for v in r.values()] for r in shown.to_pylist()]
        extra, ids = [], None
        if "sample_id" in shown.column_names and shown.num_rows:
            ids = [int(i) for i in shown.column("sample_id").to_pylist() if i is not None]
            extra = [c.strip() for c in params.get("cols", "label,pred").split(",") if c.strip()]
            rows = self._with_sample_columns(shown, rows, extra)
        state = {"rid": rid, "sort": sort, "desc": "1" if desc else "0", "cols": params.get("cols", "label,pred")}
        return {"query": query, "rid": rid, "columns": columns, "extra": extra, "rows": rows, "ids": ids,
                "page": page, "pages": pages, "total": table.num_rows, "sort": sort, "desc": desc, "state": state,
                "has_score": "score" in table.column_names, "reviewable": self._reviewable(query, table)}

    def _reviewable(self, query: str, table: pa.Table) -> bool:
        """Whether the review page can rank by this result (a link to it is offered)."""
        try:
            _check_topk_statement(query, self.s.con.registry.names())
            _check_ranking(table)
        except (HTTPError, Error):
            return False
        return True

    def _with_sample_columns(self, shown: pa.Table, rows: list, extra: list[str]) -> list:
        ids = shown.column("sample_id").to_pylist()
        known = [i for i in ids if i is not None]
        with self.s.lock:
            try:
                values = self.s.con.store.sample_columns(np.unique(known), extra) if extra else {}
            except Error as e:
                raise HTTPError(400, f"{type(e).__name__}: {e}") from None
        order = {int(i): k for k, i in enumerate(np.unique(known).tolist())}
        return [[None if i is None or int(i) not in order else _cell(values[c][order[int(i)]]) for c in extra] + r
                for i, r in zip(ids, rows)]

    async def hist_png(self, request):
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import Response, PlainTextResponse
        try:
            body = await run_in_threadpool(self._hist, request.query_params)
        except HTTPError as e:
            return PlainTextResponse(e.message, status_code=e.status)
        except Error as e:
            return PlainTextResponse(str(e), status_code=400)
        return Response(body, media_type="image/png")

    def _hist(self, params) -> bytes:
        from metaql import plot
        view = self._result_view(params)
        if view is None:
            raise HTTPError(400, "name a result: /plot/hist.png?rid=N")
        _, table = self.s.results[view["rid"]]
        if "score" not in table.column_names:
            raise HTTPError(404, "the result has no score column to plot")
        score_at = view["columns"].index("score") + len(view["extra"])
        marked = [r[score_at] for r in view["rows"] if isinstance(r[score_at], (int, float))]
        return plot.png_bytes(plot.score_histogram(table.column("score"), marked=marked))

    async def thumb(self, request):
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import PlainTextResponse, Response
        sample_id = request.path_params["sample_id"]
        try:
            scale = _int(request.query_params.get("scale", 4), "scale", 1, 16)
            body = await run_in_threadpool(self._thumb, sample_id, scale)
        except HTTPError as e:
            return PlainTextResponse(e.message, status_code=e.status)
        except Error as e:
            return PlainTextResponse(f"sample {sample_id}: {e}", status_code=404)
        return Response(body, media_type="image/png", headers={"cache-control": "max-age=3600"})

    def _thumb(self, sample_id: int, scale: int) -> bytes:
        import torch
        with self.s.lock:
            x = self.s.con.store.inputs([sample_id])
        if not isinstance(x, torch.Tensor):
            raise HTTPError(404, f"sample {sample_id}'s input is not one tensor: no thumbnail")
        return png(image_of(x[0]), scale)

    # ---- Review ----------------------------------------------------------------------------------------
    async def review(self, request):
        """GET: the ranking of a kept result (?rid=N, a TOPK statement's) or of a built-in query;
        POST: runs a TOPK statement (form field q) once, keeps its result, shows it by its rid."""
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import RedirectResponse
        q = ""
        try:
            if request.method == "POST":
                q = str((await request.form()).get("q", "")).strip()
                rid = await run_in_threadpool(self._run_ranking, q)
                return RedirectResponse("/review?" + urlencode({"rid": rid}), status_code=303)
            cards, info = await run_in_threadpool(self._review_cards, request.query_params)
        except HTTPError as e:
            return self._html("review.html", e.status, cards=[], info=None, error=e.message, q=q)
        except Error as e:
            return self._html("review.html", 400, cards=[], info=None, error=f"{type(e).__name__}: {e}", q=q)
        return self._html("review.html", cards=cards, info=info, error=None, q=info["query"])

    def _run_ranking(self, text: str) -> int:
        _check_topk_statement(text, self.s.con.registry.names())
        table = self.s.sql(text)
        _check_ranking(table)
        return self.s.keep_result(text, table)

    def _ranking(self, params) -> tuple[str, pa.Table]:
        """The statement and result to review: a kept TOPK result, or a built-in query run now."""
        if "rid" in params:
            rid = _int(params["rid"], "rid", 0, 2 ** 62)
            if rid not in self.s.results:
                raise HTTPError(404, "that result is no longer kept: run the statement again")
            query, table = self.s.results[rid]
            _check_topk_statement(query, self.s.con.registry.names())
            _check_ranking(table)
            return query, table
        k = _int(params.get("k", 24), "k", 1, MAX_K)
        train = _name(params.get("train", "train"), "train")
        source = params.get("source", "self_influence")
        if source == "self_influence":
            query = MISLABEL_QUERY.format(k=k, train=train)
        elif source == "influence":
            query = HARMFUL_QUERY.format(k=k, train=train, set=_name(params.get("set", ""), "set"))
        else:
            raise HTTPError(400, f"source must be self_influence or influence, got {source!r}")
        return query, self.s.sql(query)

    def _review_cards(self, params) -> tuple[list[dict], dict]:
        query, ranking = self._ranking(params)
        ids = ranking.column("sample_id").to_pylist()
        facts = self.s.sql("SELECT s.sample_id, s.label, s.pred, l.label AS decided, l.labeled_by, "
                           "l.labeled_at FROM samples s LEFT JOIN labels l USING (sample_id) "
                           "WHERE s.sample_id IN (SELECT unnest(?))", [ids]).to_pylist()
        by_id = {r["sample_id"]: r for r in facts}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise HTTPError(400, f"the ranking names samples that are not registered ({unknown[:5]}): "
                                 "rank samples of the store")
        cards = [dict(by_id[i], rank=n + 1, score=s) for n, (i, s) in
                 enumerate(zip(ids, ranking.column("score").to_pylist()))]
        reviewed = [c for c in cards if c["decided"] is not None]
        wrong = sum(c["decided"] != c["label"] for c in reviewed)
        return cards, {"query": query, "k": len(cards), "reviewed": len(reviewed), "mislabeled": wrong,
                       "precision": wrong / len(reviewed) if reviewed else None}

    @_json_endpoint
    def influential(self, request, body) -> dict:
        sample_id = request.path_params["sample_id"]
        n = _int(request.query_params.get("n", 3), "n", 1, 50)
        rows = self.s.sql(f"SELECT TOPK({n + 1}) train FROM INFLUENCE(layers=*, query=point({sample_id})) "
                          "ORDER BY DESC").to_pylist()
        rows = [r for r in rows if r["sample_id"] != sample_id][:n]
        return {"sample_id": sample_id, "influential": rows}

    @_json_endpoint
    def decide(self, request, body) -> dict:
        sample_id = _int(body.get("sample_id"), "sample_id", 0, 2 ** 63 - 1)
        who, verdict = _who(body.get("who")), body.get("verdict")
        with self.s.lock:
            given = self._given_label(sample_id)
            if verdict == "correct":
                label = given
            elif verdict == "mislabeled":
                label = _int(body.get("label"), "label", 0, 100_000)
                if label == given:
                    raise HTTPError(400, f"{label} is sample {sample_id}'s given label: press c for 'correct'")
            else:
                raise HTTPError(400, f"verdict must be 'mislabeled' or 'correct', got {verdict!r}")
            self._refuse_relabel(sample_id)
            self.s.con.label([sample_id], [label], by=who)
            self.s.con.annotate([sample_id], [label], by=who)
            return self._label_row(sample_id)

    @_json_endpoint
    def undo(self, request, body) -> dict:
        sample_id = _int(body.get("sample_id"), "sample_id", 0, 2 ** 63 - 1)
        who = _who(body.get("who"))
        with self.s.lock:
            row = self._label_row(sample_id)
            if row["label"] is None:
                raise HTTPError(404, f"sample {sample_id} has no label to undo")
            if row["labeled_by"] != who:
                raise HTTPError(403, f"sample {sample_id} was labeled by {row['labeled_by']}, not {who}: "
                                     "only one's own decision is undone here")
            try:
                withdraw_label(self.s.con.store, sample_id, who)
            finally:
                self.s.con.store.committed()
            return {"sample_id": sample_id, "undone": row}

    def _given_label(self, sample_id: int) -> int:
        rows = self.s.con.execute("SELECT label FROM samples WHERE sample_id = ?", [sample_id]).fetchall()
        if not rows:
            raise HTTPError(404, f"sample {sample_id} is not registered")
        return rows[0][0]

    def _refuse_relabel(self, sample_id: int) -> None:
        """A decision never replaces an earlier one: it must be undone first."""
        row = self._label_row(sample_id)
        if row["label"] is not None:
            raise HTTPError(409, f"sample {sample_id} already has label {row['label']} by {row['labeled_by']} "
                                 f"at {row['labeled_at']}; undo that decision first to change it")

    def _label_row(self, sample_id: int) -> dict:
        rows = self.s.con.execute("SELECT label, labeled_by, labeled_at FROM labels WHERE sample_id = ?",
                                  [sample_id]).fetchall()
        label, by, at = rows[0] if rows else (None, None, None)
        return {"sample_id": sample_id, "label": label, "labeled_by": by,
                "labeled_at": None if at is None else str(at)}

    @_json_endpoint
    def labels_json(self, request, body) -> dict:
        rows = self.s.sql("SELECT sample_id, label, labeled_by, labeled_at::VARCHAR AS labeled_at "
                          "FROM labels ORDER BY labeled_at, sample_id").to_pylist()
        return {"labels": rows}

    # ---- Labeling session ------------------------------------------------------------------------------
    async def session(self, request):
        from starlette.concurrency import run_in_threadpool
        try:
            values = await run_in_threadpool(self._session_view, request.query_params)
        except HTTPError as e:
            return self._html("session.html", e.status, error=e.message, pool=None, sets=[], splits=[],
                              method="lancet", methods=METHODS)
        return self._html("session.html", error=None, **values)

    def _session_view(self, params) -> dict:
        with self.s.lock:
            sets, splits = self.s.con.store.set_names(), self.s.con.store.splits()
            columns = self.s.con.store.sample_column_names()
            classes = self.s.con.execute("SELECT coalesce(max(label) + 1, 0) FROM samples").fetchone()[0]
        pool = params.get("pool")
        method = _method(params.get("method", "lancet"))
        values = {"sets": sets, "splits": splits, "pool": None, "columns": columns, "method": method,
                  "methods": METHODS}
        if pool is None:
            return values
        pool = _name(pool, "pool")
        if pool not in sets:
            raise HTTPError(404, f"no sample set '{pool}': create it on this page first")
        if method != "lancet":
            return dict(values, **self._method_view(method, pool, params, classes))
        rounds = self._rounds(pool)
        last = rounds[-1] if rounds else None
        cards = []
        if last:
            ids = [c["sample_id"] for c in last["candidates"]]
            facts = {r["sample_id"]: r for r in self.s.sql(
                "SELECT s.sample_id, s.label AS given, l.label AS labeled, l.labeled_by FROM samples s "
                "LEFT JOIN labels l USING (sample_id) WHERE s.sample_id IN (SELECT unnest(?))", [ids]).to_pylist()}
            cards = [dict(c, **facts[c["sample_id"]]) for c in last["candidates"]]
        n_labeled = self.s.sql("SELECT count(*) AS n FROM labels WHERE sample_id IN "
                               "(SELECT sample_id FROM set_members WHERE set_name = ?)", [pool]).column("n")[0].as_py()
        running = self.s.jobs.running(pool, "lancet")
        truth = params.get("truth", "true_label" if "true_label" in columns else "")
        return dict(values, pool=pool, rounds=rounds, last=last, cards=cards, n_labeled=n_labeled,
                    job=running[0]["id"] if running else None,
                    form={"budget": params.get("budget", "10"), "steps": params.get("steps", "300"),
                          "num_classes": params.get("num_classes", str(classes)), "truth": truth})

    # ---- Active learning and label cleaning: candidates from their table functions --------------------
    def _method_view(self, method: str, pool: str, params, classes: int) -> dict:
        status, note = self._status_row(method, pool)
        cards = []
        proposal = self.s.proposals.get((method, pool), [])
        if proposal:
            ids = [c["sample_id"] for c in proposal]
            facts = {r["sample_id"]: r for r in self.s.sql(
                "SELECT s.sample_id, s.label AS given, l.label AS labeled, l.labeled_by, "
                "(SELECT count(*) FROM annotations a WHERE a.sample_id = s.sample_id) AS n_annotations "
                "FROM samples s LEFT JOIN labels l USING (sample_id) WHERE s.sample_id IN (SELECT unnest(?))",
                [ids]).to_pylist()}
            cards = [dict(c, **facts[c["sample_id"]]) for c in proposal]
        form = {"k": params.get("k", "8"), "budget": params.get("budget", "0" if method == "active" else "40"),
                "update_every": params.get("update_every", "10")}
        running = self.s.jobs.running(pool, method)
        return {"pool": pool, "status_row": status, "status_note": note, "cards": cards, "form": form,
                "classes": classes, "proposed": bool(proposal), "job": running[0]["id"] if running else None}

    def _status_row(self, method: str, pool: str) -> tuple[dict | None, str | None]:
        with self.s.lock:
            return _status_row(self.s.con, method, pool)

    @_json_endpoint
    def method_candidates(self, request, body) -> dict:
        """Starts the session's next candidates as a job (its replay batches are the progress; the
        result: candidates, the STATUS row, warnings)."""
        method = _method(body.get("method"))
        if method == "lancet":
            raise HTTPError(400, "LANCET's rounds run through /api/session/round")
        pool = _name(body.get("pool"), "pool")
        arg, candidates_fn, _ = METHOD_SQL[method]
        args = {"k": _int(body.get("k", 8), "k", 1, MAX_K),
                "budget": _int(body.get("budget", 0), "budget", 0, 1_000_000)}
        if method == "cleaning":
            args["update_every"] = _int(body.get("update_every", 0), "update_every", 0, 1_000_000)
        call = ", ".join(f"{k}={v}" for k, v in args.items())
        with self.s.lock:
            if pool not in self.s.con.store.set_names():
                raise HTTPError(404, f"no sample set '{pool}'")

        def work(cur) -> dict:
            rows = cur.execute(f"SELECT * FROM {candidates_fn}({arg}={pool}, {call})").arrow().to_pylist()
            self.s.proposals[(method, pool)] = rows
            status, note = _status_row(cur, method, pool)
            return {"method": method, "candidates": rows, "status": status, "note": note}
        return self._start(method, pool, work)

    @_json_endpoint
    def method_status(self, request, body) -> dict:
        method, pool = _method(request.query_params.get("method")), _name(request.query_params.get("pool"), "pool")
        if method == "lancet":
            raise HTTPError(400, "LANCET's status is shown with its rounds")
        status, note = self._status_row(method, pool)
        return {"method": method, "pool": pool, "status": status, "note": note}

    @_json_endpoint
    def annotate(self, request, body) -> dict:
        """Appends one annotation (label cleaning's several labels per sample): nothing is replaced."""
        sample_id = _int(body.get("sample_id"), "sample_id", 0, 2 ** 63 - 1)
        who = _who(body.get("who"))
        with self.s.lock:
            classes = self.s.con.execute("SELECT coalesce(max(label) + 1, 0) FROM samples").fetchone()[0]
            # an annotation cannot be withdrawn here, and one outside the model's classes stops the session
            label = _int(body.get("label"), "label", 0, max(0, classes - 1))
            self._given_label(sample_id)
            self.s.con.annotate([sample_id], [label], by=who)
            rows = self.s.con.execute("SELECT label, annotated_by, annotated_at::VARCHAR FROM annotations "
                                      "WHERE sample_id = ? ORDER BY annotated_at", [sample_id]).fetchall()
        return {"sample_id": sample_id, "label": label, "annotated_by": who,
                "annotations": [{"label": y, "annotated_by": b, "annotated_at": a} for y, b, a in rows]}

    @_json_endpoint
    def create_pool(self, request, body) -> dict:
        name, split = _name(body.get("name"), "name"), body.get("split")
        with self.s.lock:
            if split not in self.s.con.store.splits():
                raise HTTPError(400, f"no split {split!r}; the splits are {self.s.con.store.splits()}")
            if name in self.s.con.store.set_names():
                raise HTTPError(409, f"a set '{name}' exists already: open it, or pick another name")
            self.s.con.execute(f"CREATE SET {name} AS SELECT sample_id FROM samples WHERE split = ?", [split])
            n = len(self.s.con.store.set_ids(name))
        return {"pool": name, "size": n}

    @_json_endpoint
    def label(self, request, body) -> dict:
        sample_id = _int(body.get("sample_id"), "sample_id", 0, 2 ** 63 - 1)
        label, who = _int(body.get("label"), "label", 0, 100_000), _who(body.get("who"))
        with self.s.lock:
            self._given_label(sample_id)
            self._refuse_relabel(sample_id)
            self.s.con.label([sample_id], [label], by=who)
            return self._label_row(sample_id)

    @_json_endpoint
    def start_round(self, request, body) -> dict:
        pool = _name(body.get("pool"), "pool")
        args = {"budget": _int(body.get("budget", 10), "budget", 1, MAX_BUDGET),
                "steps": _int(body.get("steps", 300), "steps", 1, MAX_STEPS),
                "num_classes": _int(body.get("num_classes", 0), "num_classes", 0, 100_000)}
        truth = body.get("truth") or ""
        who = _who(body.get("who", self.s.user))
        with self.s.lock:
            if pool not in self.s.con.store.set_names():
                raise HTTPError(404, f"no sample set '{pool}'")
            if truth and truth not in self.s.con.store.sample_column_names():
                raise HTTPError(400, f"no samples column {truth!r} to measure accuracy against")
        return self._start("lancet", pool, lambda cur: _lancet_round(cur, pool, args, truth, who))

    def _start(self, kind: str, pool: str, work: Callable) -> dict:
        try:
            return public(self.s.jobs.start(kind, pool, work))
        except Busy:
            raise HTTPError(409, "a round or a candidate search is running already: wait for it or "
                                 "cancel it") from None

    @_json_endpoint
    def job(self, request, body) -> dict:
        return public(self._job(request))

    @_json_endpoint
    def cancel(self, request, body) -> dict:
        job = self._job(request)
        self.s.jobs.cancel(job)
        return public(job)

    def _job(self, request) -> dict:
        job = self.s.jobs.jobs.get(request.path_params["job_id"])
        if job is None:
            raise HTTPError(404, "no such job")
        return job

    async def lancet_png(self, request):
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import PlainTextResponse, Response
        from metaql import plot
        pool = request.query_params.get("pool", "")
        n, values, ylabel = curve_points(self._rounds(pool))
        if not n:
            return PlainTextResponse("no round with labels yet", status_code=404)
        fig = plot.lancet_curve(n, values, ylabel=ylabel)
        return Response(await run_in_threadpool(plot.png_bytes, fig), media_type="image/png")

    def _rounds(self, pool: str) -> list[dict]:
        with self.s.lock:
            return recorded_rounds(self.s.con, pool)


def _lancet_round(cur, pool: str, args: dict, truth: str, who: str) -> dict:
    """One LANCET round on the job's cursor: the candidates, and with labels the stop rule and the
    propagated labels' accuracy (against `truth`) and confidence; recorded in the store."""
    call = ", ".join(f"{k}={v}" for k, v in args.items())
    candidates = cur.execute(f"SELECT * FROM LANCET_CANDIDATES(pool={pool}, {call})").arrow()
    round_ = {"candidates": candidates.to_pylist(), "status": None, "accuracy": None, "confidence": None,
              "truth": truth}
    round_["n_labeled"] = cur.execute(
        "SELECT count(*) FROM labels WHERE sample_id IN (SELECT sample_id FROM set_members "
        "WHERE set_name = ?)", [pool]).fetchone()[0]
    if round_["n_labeled"]:
        status_call = ", ".join(f"{k}={v}" for k, v in args.items() if k != "budget")
        round_["status"] = cur.execute(f"SELECT * FROM LANCET_STATUS(pool={pool}, {status_call})").arrow().to_pylist()[0]
        labels = cur.execute(f"SELECT * FROM LANCET(pool={pool}, {status_call})").arrow()
        round_["confidence"] = float(np.mean(labels.column("confidence").to_numpy()))
        if truth:
            ids = labels.column("sample_id").to_numpy()
            true = cur.store.sample_columns(ids, [truth])[truth]
            round_["accuracy"] = float(np.mean(labels.column("label").to_numpy() == true))
    number = record_round(cur.store, pool, round_, args, who)
    return {"round": number, "n_labeled": round_["n_labeled"], "accuracy": round_["accuracy"]}


def _check_topk_statement(text: str, function_names) -> None:
    """The review ranks with one TOPK statement (SELECT TOPK(k) ... FROM FUNCTION(...) ORDER BY
    ...), of at most MAX_K rows."""
    from metaql import ast
    from metaql.parser import parse
    if not text:
        raise HTTPError(400, "write a TOPK statement to rank by, e.g. " + MISLABEL_QUERY.format(k=24, train="train"))
    statements = parse(text, function_names)
    if len(statements) != 1 or not isinstance(statements[0], ast.TopKSelect):
        raise HTTPError(400, "the review ranks with one TOPK statement (SELECT TOPK(k) [set] FROM FUNCTION(...) "
                             "ORDER BY DESC|ASC); run other statements on the Query page")
    k = statements[0].k
    if isinstance(k, int) and not 1 <= k <= MAX_K:
        raise HTTPError(400, f"the review shows at most {MAX_K} samples: ask for TOPK(1) to TOPK({MAX_K})")


def _check_ranking(table: pa.Table) -> None:
    missing = [c for c in ("sample_id", "score") if c not in table.column_names]
    if missing:
        raise HTTPError(400, f"the ranking has no {' and no '.join(missing)} column: rank with a function whose "
                             f"result has sample_id and score (columns here: {', '.join(table.column_names)})")
    if table.num_rows > MAX_K:
        raise HTTPError(400, f"the ranking has {table.num_rows} rows; the review shows at most {MAX_K}")
    ids = table.column("sample_id")
    if ids.null_count:
        raise HTTPError(400, "the ranking has rows without a sample_id: rank samples of the store")
    if len(set(ids.to_pylist())) != table.num_rows:
        raise HTTPError(400, "the ranking lists a sample more than once: rank with one row per sample")


def _status_row(con, method: str, pool: str) -> tuple[dict | None, str | None]:
    """The session's STATUS row, or why there is none (a label-cleaning session not begun)."""
    arg, _, status_fn = METHOD_SQL[method]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = con.execute(f"SELECT * FROM {status_fn}({arg}={pool})").arrow().to_pylist()
    except Error as e:
        return None, f"{type(e).__name__}: {e}"
    return rows[0], None


def _method(value: Any) -> str:
    if value not in METHODS:
        raise HTTPError(400, f"method must be one of {', '.join(METHODS)}, got {value!r}")
    return value


def _sorted(table: pa.Table, sort: str, desc: bool) -> tuple[pa.Table, str, bool]:
    if not sort:
        return table, "", False
    if sort not in table.column_names:
        raise HTTPError(400, f"no column {sort!r} to sort by")
    try:
        return table.sort_by([(sort, "descending" if desc else "ascending")]), sort, desc
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        raise HTTPError(400, f"column {sort!r} cannot be sorted") from None


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.6g}")
    if isinstance(v, (np.floating,)):
        return float(f"{float(v):.6g}")
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    text = v if isinstance(v, (int, bool)) or v is None else str(v)
    return text[:200] + "…" if isinstance(text, str) and len(text) > 200 else text


# -- serving --------------------------------------------------------------------------------------------
def serve(store: str, host: str = "127.0.0.1", port: int = 8765, readonly: bool = False,
          token: str | None = None, user: str | None = None) -> None:
    """Runs the server until Ctrl-C. Binding beyond the loopback interface needs a token."""
    if host not in LOOPBACK and not host.startswith("127.") and not token:
        raise InvalidInputException(f"refusing to listen on {host} without a token: anyone who can reach it "
                                    f"could read and label the store; pass --token T (or bind 127.0.0.1)")
    if not Path(store).is_dir():
        raise InvalidInputException(f"no store at {store}: name a store directory (metaql demo builds one)")
    import uvicorn
    app = create_app(store, readonly=readonly, token=token, user=user, host=host)
    address = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    print(f"MetaQL on {address}{'?token=' + token if token else ''}  (Ctrl-C stops it)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        app.state.server.close()
