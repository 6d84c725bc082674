// meshless node dashboard: live updates. The pages are complete without this script; it only
// keeps them current from the agent's server-sent events (/api/events). Values are set as text,
// never as HTML.
"use strict";
(function () {
  const view = document.body.dataset.live;
  if (!view || !window.EventSource) return;
  const badge = document.getElementById("live");
  const params = new URLSearchParams(location.search);
  params.set("view", view);
  const recent = document.getElementById("recent");
  if (recent) params.set("after", recent.dataset.seq || "0");
  const source = new EventSource("/api/events?" + params.toString());
  const say = (text, on) => {
    if (!badge) return;
    badge.textContent = text;
    badge.classList.toggle("on", on);
  };
  source.onopen = () => say("live", true);
  source.onerror = () => say("reconnecting", false);

  source.addEventListener("overview", (ev) => {
    const values = JSON.parse(ev.data);
    for (const el of document.querySelectorAll("[data-key]")) {
      const v = values[el.dataset.key];
      if (typeof v === "string") el.textContent = v;
    }
  });

  source.addEventListener("flows", (ev) => {
    if (!recent) return;
    const body = recent.tBodies[0];
    for (const row of JSON.parse(ev.data)) {
      const tr = document.createElement("tr");
      tr.className = "verdict-" + row.verdict;
      tr.dataset.seq = String(row.seq);
      for (const cell of row.cells) {
        const td = document.createElement("td");
        td.textContent = cell;
        tr.appendChild(td);
      }
      const why = document.createElement("td");
      if (typeof row.why === "string" && row.why.startsWith("/why-denied?")) {
        const a = document.createElement("a");
        a.href = row.why;
        a.textContent = "why denied";
        why.appendChild(a);
      }
      tr.appendChild(why);
      body.insertBefore(tr, body.firstChild);
      recent.dataset.seq = String(row.seq);
    }
    while (body.rows.length > 200) body.deleteRow(-1);
  });
})();
