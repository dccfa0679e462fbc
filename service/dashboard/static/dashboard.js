// Slimstore dashboard: live refresh. Every 2 s, GET the live JSON (totals, the jobs panel
// rendered and escaped by the server, a fingerprint of the checkpoints). When the fingerprint
// changes (a job finished, a checkpoint appeared or went), the static sections (charts,
// tables) are fetched again and swapped in place, keeping the selected trace and scroll.
"use strict";

(function () {
  var PERIOD_MS = 2000;
  var body = document.body;
  var liveUrl = body.getAttribute("data-live-url");
  var fingerprint = body.getAttribute("data-fingerprint");
  var status = document.getElementById("live-status");
  var timer = null;

  function setStatus(text, ok) {
    if (!status) return;
    status.textContent = text;
    status.className = ok ? "live" : "live stale";
  }

  function applyTotals(totals) {
    Object.keys(totals).forEach(function (key) {
      var nodes = document.querySelectorAll('[data-total="' + key + '"]');
      for (var i = 0; i < nodes.length; i++) nodes[i].textContent = totals[key];
    });
  }

  function reloadStatic() {
    return fetch(window.location.href, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.text();
      })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("static");
        var current = document.getElementById("static");
        if (fresh && current) current.replaceWith(document.adoptNode(fresh));
        var fp = doc.body.getAttribute("data-fingerprint");
        if (fp) fingerprint = fp;
      });
  }

  function tick() {
    if (document.hidden) return schedule();
    fetch(liveUrl, { credentials: "same-origin", cache: "no-store",
                     headers: { Accept: "application/json" } })
      .then(function (r) {
        if (r.status === 401) {  // signed out (cookie expired): the page sends us to /signin
          window.location.reload();
          throw new Error("signed out");
        }
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (data) {
        applyTotals(data.totals);
        var panel = document.getElementById("jobs-panel");
        if (panel) panel.innerHTML = data.jobs_html;  // rendered (and escaped) by the server
        setStatus("live · updated " + new Date().toLocaleTimeString(), true);
        if (data.fingerprint !== fingerprint) return reloadStatic();
      })
      .catch(function (err) {
        setStatus("offline (" + err.message + "); retrying", false);
      })
      .then(schedule);
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(tick, PERIOD_MS);
  }

  schedule();
})();
