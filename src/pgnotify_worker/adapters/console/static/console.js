// pgnotify console: live overview (server-sent events fed by LISTEN). No inline script anywhere
// (the CSP allows scripts from this origin only); every page works without this file.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !window.EventSource || !window.fetch) { return; }
  var state = document.getElementById("live-state");
  var busy = false;
  function refresh() {
    if (busy) { return; }
    busy = true;
    fetch(live.getAttribute("data-src"), { credentials: "same-origin", redirect: "error" })
      .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.text(); })
      .then(function (html) { live.innerHTML = html; if (state) { state.className = "live on"; } })
      .catch(function () { if (state) { state.className = "live off"; } })
      .then(function () { busy = false; });
  }
  var source = new EventSource(live.getAttribute("data-events"));
  source.addEventListener("change", refresh);
  source.addEventListener("tick", refresh);
  source.onopen = function () { if (state) { state.className = "live on"; } };
  source.onerror = function () { if (state) { state.className = "live off"; } };
})();
