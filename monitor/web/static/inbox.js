// Polls the server-rendered fragment of the inbox so new alerts appear without a reload. Same origin, no build.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !window.fetch) { return; }
  var url = live.getAttribute("data-url");
  var seconds = parseFloat(live.getAttribute("data-seconds")) || 5;
  function tick() {
    fetch(url, { credentials: "same-origin", cache: "no-store" }).then(function (response) {
      if (response.status === 401) { window.location.assign("/signin"); return null; }
      return response.ok ? response.text() : null;
    }).then(function (html) {
      if (html !== null && html !== undefined) { live.innerHTML = html; }
    }).catch(function () { /* offline for a moment: try again at the next tick */ }).then(function () {
      window.setTimeout(tick, seconds * 1000);
    });
  }
  window.setTimeout(tick, seconds * 1000);
}());
