// Kiln dashboard: keeps a page's live part current. The page works without
// this script; with it, the part inside <main data-live=URL> is fetched again
// from URL (server-rendered, escaped HTML) when an event concerns it. Served
// as a file so the Content-Security-Policy can forbid inline script.
(function () {
  "use strict";
  var main = document.getElementById("live");
  var status = document.getElementById("live-status");
  if (!main || !window.EventSource || !window.fetch) return;
  var url = main.getAttribute("data-live");
  if (!url) return;
  // A commit page listens only to events about its commit.
  var m = /^\/fragments\/commits\/([0-9a-f]{40})/.exec(url);
  var commit = m ? m[1] : null;
  var showsLive = url === "/fragments/runners" || url === "/fragments/queue";
  // A test's history and the flaky list change when a commit's row does
  // (it ran, or ended): not on every result of a busy commit.
  var byCommitRow = /^\/fragments\/(tests\/|flaky)/.test(url);
  var after = main.getAttribute("data-seq") || "";
  var busy = false, again = false, timer = null;

  function say(text) { if (status) status.textContent = text; }

  function refresh() {
    timer = null;
    if (busy) { again = true; return; }
    busy = true; again = false;
    fetch(url + (url.indexOf("?") < 0 ? "?" : "&") + "t=" + Date.now(), { credentials: "same-origin" })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.text(); })
      .then(function (html) { main.innerHTML = html; })
      .catch(function (e) { say("refresh failed: " + e.message); })
      .then(function () { busy = false; if (again) schedule(); });
  }

  // At most one fetch in flight and one every 200 ms: a busy commit sends
  // many events a second.
  function schedule() { if (!timer) timer = setTimeout(refresh, 200); }

  var es = new EventSource("/api/v1/events" + (after ? "?after=" + encodeURIComponent(after) : ""));
  es.onopen = function () { say("live"); };
  es.onerror = function () { say("reconnecting…"); };
  es.addEventListener("change", function (e) {
    if (commit && e.data.indexOf(commit) < 0) return;
    if (byCommitRow && e.data.indexOf('"kind":"commit"') < 0) return;
    schedule();
  });
  es.addEventListener("live", function () { if (showsLive) schedule(); });
  // Events were missed (or the dispatcher restarted): show the page anew.
  es.addEventListener("reload", function () { es.close(); window.location.reload(); });
})();
