// MetaQL's pages: keyboard review and labeling, round progress. Data reaches the DOM only through
// textContent and attributes, never innerHTML, so no stored value can become markup.
"use strict";

function who() {
  const field = document.getElementById("who");
  return (field && field.value.trim()) || document.body.dataset.user;
}

function say(text, bad) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.className = bad ? "status error" : "status";
}

async function post(url, body) {
  const r = await fetch(url, {method: "POST", headers: {"content-type": "application/json"},
                              body: JSON.stringify(body)});
  const data = await r.json().catch(() => ({error: "HTTP " + r.status}));
  if (!r.ok) throw new Error(data.error || ("HTTP " + r.status));
  return data;
}

function initWho() {
  const field = document.getElementById("who");
  if (!field) return;
  const saved = localStorage.getItem("metaql-who");
  if (saved) field.value = saved;
  field.addEventListener("change", () => localStorage.setItem("metaql-who", field.value.trim()));
}

// ---- a grid of cards with one selected, moved by the arrows -------------------------------------
function Grid(root) {
  this.cards = Array.from(root.querySelectorAll(".card"));
  this.at = Math.max(0, this.cards.findIndex(c => !c.dataset.decided));
  if (this.at === -1 || this.at >= this.cards.length) this.at = 0;
  this.cards.forEach((c, i) => c.addEventListener("click", () => this.select(i)));
  this.select(this.at);
}
Grid.prototype.current = function () { return this.cards[this.at]; };
Grid.prototype.select = function (i) {
  if (!this.cards.length) return;
  this.at = Math.max(0, Math.min(this.cards.length - 1, i));
  this.cards.forEach((c, j) => c.classList.toggle("selected", j === this.at));
  this.cards[this.at].scrollIntoView({block: "nearest"});
};
Grid.prototype.move = function (key) {
  const top = this.cards[0].offsetTop;      // cards per row: those on the first row
  const perRow = Math.max(1, this.cards.filter(c => c.offsetTop === top).length);
  const step = {ArrowRight: 1, ArrowLeft: -1, ArrowDown: perRow, ArrowUp: -perRow}[key];
  if (step === undefined) return false;
  this.select(this.at + step);
  return true;
};
Grid.prototype.next = function () {
  for (let i = this.at + 1; i < this.cards.length; i++) if (!this.cards[i].dataset.decided) return this.select(i);
  this.select(this.at + 1);
};

function typing(e) { return ["INPUT", "TEXTAREA", "SELECT"].includes(e.target.tagName); }

function showDecision(card, label, by) {
  card.dataset.decided = label === null ? "" : String(label);
  card.classList.toggle("decided", label !== null);
  card.querySelector(".decision").textContent = label === null ? "" : "decided: " + label + " by " + by;
}

// ---- Review --------------------------------------------------------------------------------------
function precisionText() {
  const cards = Array.from(document.querySelectorAll("#review-grid .card")).filter(c => c.dataset.decided !== "");
  const wrong = cards.filter(c => c.dataset.decided !== c.dataset.given).length;
  const el = document.getElementById("precision");
  el.dataset.reviewed = cards.length;
  el.dataset.mislabeled = wrong;
  el.textContent = "precision so far: " + (cards.length ? wrong + "/" + cards.length + " = " + (wrong / cards.length).toFixed(3) : "no decision yet");
}

function initReview() {
  const root = document.getElementById("review-grid");
  if (!root) return;
  const grid = new Grid(root);
  const done = [];   // this page's decisions, newest last: what u undoes
  document.addEventListener("keydown", async e => {
    if (typing(e) || e.ctrlKey || e.metaKey || e.altKey) return;
    if (grid.move(e.key)) { e.preventDefault(); return; }
    const card = grid.current();
    if (!card) return;
    const id = Number(card.dataset.sample);
    try {
      if (/^[0-9]$/.test(e.key) || e.key === "c") {
        e.preventDefault();
        const body = e.key === "c" ? {sample_id: id, verdict: "correct", who: who()}
                                   : {sample_id: id, verdict: "mislabeled", label: Number(e.key), who: who()};
        const row = await post("/api/review/decide", body);
        showDecision(card, row.label, row.labeled_by);
        done.push(card);
        say("sample " + id + ": " + (body.verdict === "correct" ? "correct" : "mislabeled, true label " + row.label));
        precisionText();
        grid.next();
      } else if (e.key === "s") {
        grid.next();
      } else if (e.key === "u" || e.key === "Backspace") {
        e.preventDefault();
        const last = done.pop();
        if (!last) { say("nothing to undo on this page"); return; }
        await post("/api/review/undo", {sample_id: Number(last.dataset.sample), who: who()});
        showDecision(last, null, null);
        grid.select(grid.cards.indexOf(last));
        say("undone: sample " + last.dataset.sample);
        precisionText();
      }
    } catch (err) { say(err.message, true); }
  });
  root.querySelectorAll(".influential").forEach(async el => {
    try {
      const r = await fetch("/api/influential/" + el.dataset.for + "?n=3");
      const data = await r.json();
      if (!r.ok) throw new Error(data.error);
      el.textContent = "influential: ";
      data.influential.forEach(s => {
        const img = document.createElement("img");
        img.src = "/thumb/" + s.sample_id + ".png?scale=2";
        img.alt = img.title = "sample " + s.sample_id + " (influence " + s.score.toPrecision(3) + ")";
        img.className = "mini";
        el.appendChild(img);
      });
    } catch (err) { el.textContent = "influential: unavailable (" + err.message + ")"; }
  });
}

// ---- Labeling session ----------------------------------------------------------------------------
function initSession() {
  const make = document.getElementById("make-pool");
  if (make) make.addEventListener("click", async () => {
    try {
      const name = document.getElementById("pool-name").value.trim();
      await post("/api/session/pool", {name: name, split: document.getElementById("pool-split").value});
      const method = document.getElementById("pool-method").value;
      location.href = "/session?pool=" + encodeURIComponent(name) + (method === "lancet" ? "" : "&method=" + method);
    } catch (err) { say(err.message, true); }
  });
  const poolEl = document.getElementById("pool");
  if (!poolEl) return;
  if (poolEl.dataset.method) { initMethodSession(poolEl.dataset.pool, poolEl.dataset.method); return; }
  const pool = poolEl.dataset.pool;
  const root = document.getElementById("session-grid");
  if (root) {
    const grid = new Grid(root);
    onNumberKeys(grid, async (card, label) => {
      await labelCard(card, label);
      grid.next();
    });
  }
  const form = document.getElementById("round-form");
  const job = watchJob(() => {             // the next page keeps this round's settings
    const f = new FormData(form);
    location.href = "/session?" + new URLSearchParams({pool: pool, budget: f.get("budget"), steps: f.get("steps"),
                                                      num_classes: f.get("num_classes"), truth: f.get("truth")});
  });
  document.getElementById("run-round").addEventListener("click", () => {
    const f = new FormData(form);
    job.start("/api/session/round", {pool: pool, budget: Number(f.get("budget")), steps: Number(f.get("steps")),
                                     num_classes: Number(f.get("num_classes")), truth: f.get("truth"), who: who()});
  });
}

// ---- a background job (a LANCET round, the next candidates): progress bar and Cancel ---------------
// The page's #progress, #progress-text (data-job: a job running when the page was drawn) and
// #cancel-job; onDone(state) runs when the job finished without error or cancel.
function watchJob(onDone) {
  const text = document.getElementById("progress-text");
  const bar = document.getElementById("progress");
  const cancel = document.getElementById("cancel-job");
  let job = text.dataset.job ? Number(text.dataset.job) : null;

  async function poll() {
    if (job === null) return;
    try {
      const r = await fetch("/api/jobs/" + job);
      const s = await r.json();
      if (!r.ok) throw new Error(s.error);
      bar.hidden = false;
      if (s.total) { bar.max = s.total; bar.value = Math.min(s.done, s.total); }
      else bar.removeAttribute("value");           // no count yet: an indeterminate bar
      text.textContent = s.state + (s.total ? ": " + s.desc + " " + s.done + "/" + s.total : "");
      if (s.state === "running") { setTimeout(poll, 300); return; }
      cancel.disabled = true;
      job = null;
      if (s.state === "done") { onDone(s); return; }
      say(s.state === "failed" ? s.error : "cancelled", s.state === "failed");
    } catch (err) { say(err.message, true); }
  }
  cancel.addEventListener("click", async () => {
    if (job === null) return;
    try { await post("/api/jobs/" + job + "/cancel", {}); } catch (err) { say(err.message, true); }
  });
  poll();
  return {
    start: async (url, body) => {
      bar.hidden = false;                          // at once: the first count comes with the first poll
      bar.removeAttribute("value");
      text.textContent = "starting";
      try {
        const s = await post(url, body);
        job = s.id;
        cancel.disabled = false;
        poll();
      } catch (err) {
        bar.hidden = true;
        text.textContent = "";
        say(err.message, true);
      }
    },
  };
}

// ---- Active learning / label cleaning: candidates from their table functions -----------------------
function showStatus(status) {
  if (!status) return;
  Object.entries(status).forEach(([key, value]) => {
    const cell = document.querySelector('#status-row td[data-key="' + key + '"]');
    if (cell) cell.textContent = value === null ? "NULL" : String(value);
  });
}

function initMethodSession(pool, method) {
  const form = document.getElementById("method-form");
  const job = watchJob(() => {
    const keep = {pool: pool, method: method};
    for (const [k, v] of new FormData(form).entries()) keep[k] = v;     // the next page keeps these settings
    location.href = "/session?" + new URLSearchParams(keep);
  });
  document.getElementById("get-candidates").addEventListener("click", () => {
    const f = new FormData(form);
    const body = {pool: pool, method: method, k: Number(f.get("k")), budget: Number(f.get("budget"))};
    if (method === "cleaning") body.update_every = Number(f.get("update_every"));
    job.start("/api/session/candidates", body);
  });
  const root = document.getElementById("method-grid");
  if (!root) return;
  const grid = new Grid(root);
  onNumberKeys(grid, async (card, label) => {
    if (method === "active") {
      await labelCard(card, label);
    } else {
      const r = await post("/api/annotate", {sample_id: Number(card.dataset.sample), label: label, who: who()});
      card.querySelector(".n-annotations").textContent = String(r.annotations.length);
      card.querySelector(".decision").textContent = "annotated: " + r.label + " by " + r.annotated_by;
      say("sample " + r.sample_id + " annotated " + r.label);
    }
    grid.next();
    const s = await (await fetch("/api/session/status?" + new URLSearchParams({pool: pool, method: method}))).json();
    showStatus(s.status);
  });
}

// Arrows move in the grid; a number key gives the current card that label through `write(card, label)`.
function onNumberKeys(grid, write) {
  document.addEventListener("keydown", async e => {
    if (typing(e) || e.ctrlKey || e.metaKey || e.altKey) return;
    if (grid.move(e.key)) { e.preventDefault(); return; }
    if (!/^[0-9]$/.test(e.key) || !grid.current()) return;
    try { await write(grid.current(), Number(e.key)); } catch (err) { say(err.message, true); }
  });
}

// One label per sample (the labels table), shown on its card.
async function labelCard(card, label) {
  const row = await post("/api/label", {sample_id: Number(card.dataset.sample), label: label, who: who()});
  showDecision(card, row.label, row.labeled_by);
  say("sample " + row.sample_id + " labeled " + row.label);
}

function initQuery() {      // Ctrl-Enter runs the console's statement, or ranks the review page's
  [["q", "console"], ["review-q", "rank-form"]].forEach(([box, form]) => {
    const q = document.getElementById(box);
    if (q) q.addEventListener("keydown", e => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); document.getElementById(form).submit(); }
    });
  });
}

document.addEventListener("DOMContentLoaded", () => { initWho(); initQuery(); initReview(); initSession(); });
