// The fleet page's script: signs in from the link's fragment, and keeps the page's live
// part current. The server sends an event when the fleet changes; the page then fetches
// its own view again (HTML, rendered and escaped by the server).
(function () {
  "use strict";

  var login = document.getElementById("login");
  if (login) {
    var secret = location.hash.slice(1);
    // The secret leaves the address bar and the history at once.
    history.replaceState(null, "", location.pathname);
    // Signing in takes a click: a link another site opens cannot sign this browser in to
    // someone else's session by itself.
    if (secret) {
      login.elements.secret.value = decodeURIComponent(secret);
    } else {
      document.getElementById("sign-in").disabled = true;
      document.getElementById("login-note").textContent =
        "This address has no login secret: run `stagehand ui` for a link.";
    }
    return;
  }

  // Buttons that ask first (abort).
  document.addEventListener("submit", function (e) {
    var ask = e.target.getAttribute("data-confirm");
    if (ask && !window.confirm(ask)) e.preventDefault();
  });

  var main = document.getElementById("live");
  var state = document.getElementById("live-state");
  if (!main || !window.EventSource) return;

  function show(text, cls) {
    if (!state) return;
    state.textContent = text;
    state.className = cls;
  }

  function signedOut() {
    show("signed out", "bad");
    var note = document.createElement("div");
    note.className = "flash bad";
    note.id = "session-ended";
    note.textContent = "Your session has ended. Run `stagehand ui` for a new link.";
    if (!document.getElementById("session-ended")) document.body.insertBefore(note, main);
  }

  var busy = false, again = false, missed = false;
  function refresh() {
    // A hidden tab fetches nothing; it catches up when it is shown again.
    if (document.hidden) { missed = true; return; }
    if (busy) { again = true; return; }
    busy = true;
    fetch(location.pathname + location.search, {
      headers: { "X-Stagehand-Live": "1" },
      credentials: "same-origin",
      cache: "no-store"
    }).then(function (r) {
      if (r.status === 401) { signedOut(); return null; }
      return r.ok ? r.text() : null;
    }).then(function (html) {
      if (html === null) return;
      // Folded sections stay as the reader left them.
      var open = {};
      main.querySelectorAll("details[id]").forEach(function (d) { open[d.id] = d.open; });
      main.innerHTML = html;
      main.querySelectorAll("details[id]").forEach(function (d) {
        if (d.id in open) d.open = open[d.id];
      });
      document.body.setAttribute("data-updated", String(Date.now()));
    }).catch(function () {
      show("reconnecting", "busy");
    }).then(function () {
      busy = false;
      if (again) { again = false; refresh(); }
    });
  }

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && missed) { missed = false; refresh(); }
  });

  var events = new EventSource("/events");
  events.addEventListener("change", refresh);
  events.addEventListener("signed-out", function () { events.close(); signedOut(); });
  events.onopen = function () { show("live", "ok"); };
  // A refused stream (401, or too many pages: 429/503) closes it; only a 401 means the
  // session ended, which the next fetch tells.
  events.onerror = function () {
    show(events.readyState === EventSource.CLOSED ? "not live: reload" : "reconnecting", "busy");
    if (events.readyState === EventSource.CLOSED) refresh();
  };
})();
