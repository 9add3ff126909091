// Testflinger web UI: the live part of a job page. Without this script the page shows
// the log as it was when rendered; with it, each log (output, serial) follows
// GET /v1/result/<id>/log/<type>/stream (Server-Sent Events) from the fragment after the
// last one rendered, and EventSource resumes with Last-Event-ID after a dropped
// connection. The job's state is polled from /jobs/<id>/summary.json and shown without a
// reload (with the facts and phases table re-read from the page when it changes); both
// stop once the job is complete or cancelled.
(function () {
  "use strict";
  var root = document.querySelector("[data-live-job]");
  if (!root) return;
  var id = root.getAttribute("data-live-job");
  var stateEl = document.getElementById("job-state");
  var terminal = root.getAttribute("data-terminal") === "true";
  var TERMINAL = { complete: true, completed: true, cancelled: true };

  // Copy button for the definition.
  var copy = document.querySelector("[data-copy]");
  if (copy && navigator.clipboard) {
    copy.hidden = false;
    copy.addEventListener("click", function () {
      var src = document.getElementById(copy.getAttribute("data-copy"));
      navigator.clipboard.writeText(src.textContent).then(function () {
        copy.textContent = "Copied";
        setTimeout(function () { copy.textContent = "Copy YAML"; }, 2000);
      }, function () { copy.textContent = "Copy failed: select the text"; });
    });
  }

  var form = document.querySelector("[data-cancel-form]");
  if (form) {
    form.addEventListener("submit", function (e) {
      if (!window.confirm("Cancel this job?")) e.preventDefault();
    });
  }

  // The facts and the phases table as the server renders them now (one fetch of this
  // page; the logs are left alone).
  function refreshParts() {
    fetch(window.location.pathname, { cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        ["job-facts", "job-phases"].forEach(function (id) {
          var mine = document.getElementById(id);
          var fresh = doc.getElementById(id);
          if (mine && fresh) mine.innerHTML = fresh.innerHTML;
        });
      })
      .catch(function () { /* keep what is shown */ });
  }

  function setState(s) {
    if (!stateEl || !s || stateEl.textContent === s) return;
    stateEl.textContent = s;
    stateEl.className = "state state-" + s;
    if (TERMINAL[s]) {
      terminal = true;
      root.setAttribute("data-terminal", "true");
      if (form) form.remove();
    }
    refreshParts();
  }

  var sections = document.querySelectorAll(".log-section");
  var streams = [];
  Array.prototype.forEach.call(sections, function (sec) {
    var type = sec.getAttribute("data-log-type");
    var pre = sec.querySelector("[data-log]");
    var tools = sec.querySelector(".log-tools");
    var follow = sec.querySelector("[data-follow]");
    var filter = sec.querySelector("[data-phase-filter]");
    var status = sec.querySelector(".live-status");
    var none = sec.querySelector(".no-output");
    var lastKey = null;
    var spans = pre.querySelectorAll("span[data-phase]");
    if (spans.length) {
      var lastSpan = spans[spans.length - 1];
      lastKey = lastSpan.getAttribute("data-attempt") + "/" + lastSpan.getAttribute("data-phase");
    }
    tools.hidden = false;
    pre.scrollTop = pre.scrollHeight;

    function applyFilter() {
      var want = filter.value;
      Array.prototype.forEach.call(pre.querySelectorAll("span[data-phase]"), function (s) {
        s.hidden = want !== "" && s.getAttribute("data-phase") !== want;
      });
    }
    filter.addEventListener("change", applyFilter);

    function append(phase, attempt, text) {
      attempt = attempt || 1;
      var key = attempt + "/" + phase;
      var atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 24;
      if (pre.hasAttribute("data-empty")) {
        pre.removeAttribute("data-empty");
        if (none) none.remove();
      }
      var hide = filter.value !== "" && filter.value !== phase;
      if (key !== lastKey) {
        var mark = document.createElement("span");
        mark.className = "phase-mark";
        mark.setAttribute("data-phase", phase);
        mark.setAttribute("data-attempt", String(attempt));
        var tail = pre.textContent;
        var heading = attempt > 1 ? phase + " (attempt " + attempt + ")" : phase;
        mark.textContent = (tail && tail.slice(-1) !== "\n" ? "\n" : "") + "── " + heading + " ──\n";
        mark.hidden = hide;
        pre.appendChild(mark);
        lastKey = key;
      }
      var span = document.createElement("span");
      span.setAttribute("data-phase", phase);
      span.setAttribute("data-attempt", String(attempt));
      span.textContent = text;
      span.hidden = hide;
      pre.appendChild(span);
      if (follow.checked && atEnd) pre.scrollTop = pre.scrollHeight;
    }

    if (terminal || !window.EventSource) {
      status.textContent = terminal ? "" : "live output needs EventSource";
      return;
    }
    var next = sec.getAttribute("data-next") || "0";
    var url = "/v1/result/" + encodeURIComponent(id) + "/log/" + type + "/stream?start_fragment=" + next;
    var es = new EventSource(url);
    streams.push(es);
    status.textContent = "live";
    es.onmessage = function (e) {
      try {
        var f = JSON.parse(e.data);
        append(f.phase, f.attempt, f.log_data);
      } catch (err) { /* a malformed event: skip it */ }
    };
    es.addEventListener("end", function (e) {
      es.close();
      status.textContent = "ended";
      try { setState(JSON.parse(e.data).job_state); } catch (err) { /* state comes from the poll */ }
    });
    es.onerror = function () {
      // EventSource reconnects by itself, sending Last-Event-ID.
      status.textContent = es.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting…";
    };
    es.onopen = function () { status.textContent = "live"; };
  });

  function poll() {
    if (terminal) return;
    fetch("/jobs/" + encodeURIComponent(id) + "/summary.json", { cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (s) {
        if (s) {
          setState(s.job_state);
        }
      })
      .catch(function () { /* try again at the next tick */ })
      .then(function () { if (!terminal) setTimeout(poll, 2000); });
  }
  if (!terminal) setTimeout(poll, 2000);
})();
