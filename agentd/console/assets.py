"""The console's one stylesheet and one script, served from ``/ui/static/`` by the daemon.

Kept as Python strings so the package needs no data files, no build step and no CDN.
The script only adds what a page without it lacks: countdowns that tick, and live
updates (an ``EventSource`` on the API's event stream that re-fetches the page's live
region from the server, which renders and escapes it as it renders the page). Every
page works without it.
"""

from __future__ import annotations

import hashlib
from typing import Final

CSS: Final = """
:root { color-scheme: light dark; --fg: #1b1f24; --bg: #fff; --muted: #59636e;
  --line: #d0d7de; --accent: #0550ae; --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700;
  --info: #8250df; --card: #f6f8fa; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6edf3; --bg: #0d1117;
  --muted: #9198a1; --line: #3d444d; --accent: #4493f8; --ok: #3fb950; --bad: #f85149;
  --warn: #d29922; --info: #ab7df8; --card: #151b23; } }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, sans-serif; color: var(--fg);
  background: var(--bg); }
a { color: var(--accent); }
a:focus-visible, button:focus-visible, input:focus-visible, select:focus-visible,
summary:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
.skip { position: absolute; left: -999px; }
.skip:focus { left: 8px; top: 8px; background: var(--bg); padding: 4px 8px; z-index: 2; }
header { display: flex; flex-wrap: wrap; align-items: center; gap: 4px 16px;
  padding: 8px 16px; border-bottom: 1px solid var(--line); background: var(--card); }
header .brand { font-weight: 700; margin-right: 8px; }
nav ul { display: flex; flex-wrap: wrap; gap: 2px 4px; list-style: none; margin: 0;
  padding: 0; }
nav a { display: inline-block; padding: 6px 10px; border-radius: 6px;
  text-decoration: none; }
nav a[aria-current="page"] { background: var(--accent); color: var(--bg); }
.who { margin-left: auto; color: var(--muted); font-size: 13px; }
.who form { display: inline; }
main { padding: 12px 16px 40px; max-width: 1400px; }
h1 { font-size: 22px; margin: 8px 0 12px; }
h2 { font-size: 18px; margin: 24px 0 8px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
caption { text-align: left; color: var(--muted); padding: 4px 0; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace;
  font-size: 13px; }
pre { background: var(--card); padding: 8px; border-radius: 6px; overflow-x: auto;
  white-space: pre-wrap; word-break: break-word; max-height: 420px; }
.badge { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12px;
  border: 1px solid currentColor; white-space: nowrap; }
.st-succeeded, .st-success { color: var(--ok); }
.st-quarantined, .st-failure, .st-timeout, .st-denied, .st-budget_exhausted,
.st-bad { color: var(--bad); }
.st-queued, .st-running, .st-info { color: var(--accent); }
.st-awaiting_approval, .st-paused, .st-late, .st-warn { color: var(--warn); }
.st-dropped, .st-cancelled, .st-skipped, .st-inactive { color: var(--muted); }
.notice { padding: 8px 12px; border-left: 4px solid var(--ok); background: var(--card);
  margin: 8px 0; }
.error { border-left-color: var(--bad); }
.muted { color: var(--muted); }
form.filters { display: flex; flex-wrap: wrap; gap: 8px 12px; align-items: end;
  margin-bottom: 12px; }
form.filters label, .field label { display: block; font-size: 13px; color: var(--muted); }
input, select, textarea, button { font: inherit; padding: 6px 8px; border-radius: 6px;
  border: 1px solid var(--line); background: var(--bg); color: var(--fg); }
button { cursor: pointer; background: var(--card); min-height: 36px; }
button.primary { background: var(--accent); color: var(--bg); border-color: var(--accent); }
button.danger { color: var(--bad); border-color: var(--bad); }
button[disabled] { opacity: .5; cursor: not-allowed; }
.actions { display: flex; flex-wrap: wrap; gap: 6px; align-items: end; }
.actions form { display: flex; gap: 6px; align-items: end; flex-wrap: wrap; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr));
  gap: 8px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 8px 12px; }
.card dt { color: var(--muted); font-size: 12px; }
.card dd { margin: 0 0 4px; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; }
dl.kv dt { color: var(--muted); }
dl.kv dd { margin: 0; word-break: break-word; }
figure.chart { margin: 8px 0 16px; }
figure.chart svg { width: 100%; height: auto; max-height: 280px; display: block; }
.grid { stroke: var(--line); stroke-width: 1; }
.axis { fill: var(--muted); font-size: 11px; }
.s-success { fill: var(--ok); background: var(--ok); }
.s-failure { fill: var(--bad); background: var(--bad); }
.s-other { fill: var(--muted); background: var(--muted); }
.s-active { fill: var(--accent); background: var(--accent); }
.s-spend { fill: var(--info); background: var(--info); }
.s-late { fill: var(--warn); background: var(--warn); }
.s-t0 { fill: #0969da; background: #0969da; } .s-t1 { fill: #bf3989; background: #bf3989; }
.s-t2 { fill: #1a7f37; background: #1a7f37; } .s-t3 { fill: #bc4c00; background: #bc4c00; }
.s-t4 { fill: #6639ba; background: #6639ba; }
@media (min-width: 1000px) { .charts { display: grid; grid-template-columns: 1fr 1fr;
  gap: 16px; } }
.legend { display: flex; flex-wrap: wrap; gap: 12px; list-style: none; padding: 0;
  margin: 4px 0; font-size: 13px; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 4px;
  border-radius: 2px; vertical-align: -1px; }
progress, meter { width: 160px; height: 14px; vertical-align: middle; }
#live { font-size: 13px; color: var(--muted); }
.login { max-width: 420px; }
@media (max-width: 640px) {
  body { font-size: 14px; }
  main { padding: 8px 8px 32px; }
  header { padding: 6px 8px; }
  .who { margin-left: 0; }
  th, td { padding: 5px 6px; }
  dl.kv { grid-template-columns: 1fr; }
  dl.kv dt { margin-top: 6px; }
  progress, meter { width: 100px; }
}
"""

JS: Final = r"""
"use strict";
(function () {
  function pad(n) { return n < 10 ? "0" + n : "" + n; }
  function human(s) {
    var neg = s < 0; s = Math.abs(Math.round(s));
    var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600),
        m = Math.floor(s % 3600 / 60), sec = s % 60;
    var t = d ? d + "d " + h + "h" : h ? h + "h " + pad(m) + "m" :
            m ? m + "m " + pad(sec) + "s" : sec + "s";
    return neg ? t + " ago" : "in " + t;
  }
  function tick() {
    var now = Date.now();
    document.querySelectorAll("[data-countdown]").forEach(function (el) {
      var at = Date.parse(el.getAttribute("data-countdown"));
      if (!isNaN(at)) { el.textContent = human((at - now) / 1000); }
    });
  }
  tick(); setInterval(tick, 1000);

  var live = document.querySelector("[data-live-stream]");
  var status = document.getElementById("live");
  if (!live || !window.EventSource) { return; }
  var kinds = (live.getAttribute("data-live-kinds") || "").split(" ");
  var timer = null, busy = false, again = false;
  function say(text) { if (status) { status.textContent = text; } }
  function refresh() {
    timer = null;
    if (busy) { again = true; return; }
    busy = true;
    fetch(live.getAttribute("data-live-fragment"), {
      credentials: "same-origin", headers: { "X-Console-Fragment": "1" }
    }).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.text();
    }).then(function (html) {
      live.innerHTML = html; tick();
      say("live: updated " + new Date().toLocaleTimeString());
    }).catch(function () { say("live: update failed; reload the page"); })
      .finally(function () { busy = false; if (again) { again = false; soon(); } });
  }
  function soon() { if (!timer) { timer = setTimeout(refresh, 300); } }
  var es = new EventSource(live.getAttribute("data-live-stream"));
  es.onopen = function () { say("live"); };
  es.onerror = function () {
    say(es.readyState === 2 ? "live: finished" : "live: reconnecting");
  };
  kinds.forEach(function (k) {
    if (k && k !== "heartbeat") { es.addEventListener(k, soon); }
  });
})();
"""

ICON: Final = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    '<rect width="16" height="16" rx="3" fill="#0550ae"/>'
    '<path d="M4 12 8 4l4 8M5.5 9h5" stroke="#fff" stroke-width="1.6" fill="none"/></svg>'
)

ICON_ETAG: Final = hashlib.sha256(ICON.encode()).hexdigest()[:16]
CSS_ETAG: Final = hashlib.sha256(CSS.encode()).hexdigest()[:16]
JS_ETAG: Final = hashlib.sha256(JS.encode()).hexdigest()[:16]
