(function () {
  "use strict";
  var main = document.getElementById("live");
  var status = document.getElementById("status");
  if (!main || !status) { return; }
  function say(state, text) { status.dataset.state = state; status.textContent = text; }
  function tick() {
    fetch(location.pathname + location.search, { headers: { "X-Maeum-Fragment": "1" }, cache: "no-store", credentials: "same-origin" })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) {
        if (html !== main.innerHTML) {
          // Keep open <details> open across the swap.
          var open = Array.prototype.map.call(main.querySelectorAll("details[open] > summary"), function (s) { return s.parentElement.id || s.textContent; });
          main.innerHTML = html;
          Array.prototype.forEach.call(main.querySelectorAll("details > summary"), function (s) {
            if (open.indexOf(s.parentElement.id || s.textContent) >= 0) { s.parentElement.open = true; }
          });
        }
        say("live", "Live: updated " + new Date().toLocaleTimeString() + ".");
      })
      .catch(function (e) { say("offline", "The console is not answering (" + e.message + "); retrying."); })
      .then(function () { setTimeout(tick, 2000); });
  }
  setTimeout(tick, 2000);
})();
