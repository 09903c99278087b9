/* Palimpsest admin: draws the charts embedded as JSON, ticks deadline countdowns and
   polls running jobs. No inline handlers, no eval, no innerHTML of server data: the page's
   Content-Security-Policy allows scripts from this origin only. */
(function () {
  "use strict";

  var POLL_MS = 2000;
  var ACTIVE = { pending: true, running: true };

  function drawCharts() {
    var holder = document.getElementById("chart-data");
    if (!holder || typeof window.Plotly === "undefined") {
      return;
    }
    var figures;
    try {
      figures = JSON.parse(holder.textContent || "{}");
    } catch (err) {
      return;
    }
    Object.keys(figures).forEach(function (id) {
      var target = document.getElementById(id);
      var fig = figures[id];
      if (!target || !fig) {
        return;
      }
      window.Plotly.newPlot(target, fig.data || [], fig.layout || {}, {
        displayModeBar: false,
        displaylogo: false,
        responsive: true
      });
    });
  }

  function duration(seconds) {
    var s = Math.abs(seconds);
    if (s < 60) {
      return Math.floor(s) + "s";
    }
    if (s < 3600) {
      return Math.floor(s / 60) + "m " + Math.floor(s % 60) + "s";
    }
    if (s < 86400) {
      return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
    }
    return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
  }

  function tickCountdowns() {
    var now = Date.now();
    document.querySelectorAll("[data-countdown]").forEach(function (el) {
      var due = Date.parse(el.getAttribute("data-due") || "");
      if (isNaN(due)) {
        return;
      }
      var left = (due - now) / 1000;
      el.textContent = left > 0 ? duration(left) + " left" : "overdue by " + duration(-left);
      el.classList.toggle("late", left <= 0);
      el.classList.toggle("soon", left > 0 && left < 3 * 86400);
    });
  }

  function setBadge(holder, status) {
    if (!holder) {
      return;
    }
    var span = document.createElement("span");
    span.className = "badge badge-" + status;
    span.textContent = status.replace(/_/g, " ");
    while (holder.firstChild) {
      holder.removeChild(holder.firstChild);
    }
    holder.appendChild(span);
  }

  function updateJob(job) {
    var finished = false;
    document.querySelectorAll('progress[data-job-id="' + CSS.escape(job.id) + '"]').forEach(function (bar) {
      if (ACTIVE[bar.getAttribute("data-status")] && !ACTIVE[job.status]) {
        finished = true;
      }
      bar.value = job.percent;
      bar.textContent = job.percent + "%";
      bar.setAttribute("data-status", job.status);
    });
    document.querySelectorAll('[data-job-percent="' + CSS.escape(job.id) + '"]').forEach(function (el) {
      el.textContent = job.percent + "%";
    });
    document.querySelectorAll('[data-job-status="' + CSS.escape(job.id) + '"]').forEach(function (el) {
      setBadge(el, job.status);
    });
    return finished;
  }

  function liveJobIds() {
    var ids = [];
    document.querySelectorAll("progress[data-job-id]").forEach(function (bar) {
      var id = bar.getAttribute("data-job-id");
      if (ACTIVE[bar.getAttribute("data-status")] && ids.indexOf(id) < 0) {
        ids.push(id);
      }
    });
    return ids;
  }

  function poll() {
    var ids = liveJobIds();
    if (!ids.length) {
      return; // nothing is moving on this page
    }
    if (document.hidden) {
      window.setTimeout(poll, POLL_MS);
      return;
    }
    fetch("/admin/jobs.json?ids=" + encodeURIComponent(ids.join(",")), {
      credentials: "same-origin",
      headers: { Accept: "application/json" }
    })
      .then(function (resp) {
        if (resp.redirected) {
          window.location.reload(); // the session ended: the log-in form
          throw new Error("logged out");
        }
        if (!resp.ok) {
          throw new Error("HTTP " + resp.status);
        }
        return resp.json();
      })
      .then(function (body) {
        var finished = false;
        (body.jobs || []).forEach(function (job) {
          finished = updateJob(job) || finished;
        });
        if (finished && document.body.hasAttribute("data-reload-on-finish")) {
          window.location.reload(); // show the result and any error log
          return;
        }
        window.setTimeout(poll, POLL_MS);
      })
      .catch(function () {
        window.setTimeout(poll, POLL_MS * 3);
      });
  }

  function start() {
    drawCharts();
    tickCountdowns();
    window.setInterval(tickCountdowns, 1000);
    window.setTimeout(poll, POLL_MS);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
