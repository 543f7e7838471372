// modelcache dashboard, live parts: an element with data-live="URL" is refreshed from URL, a fragment
// the server renders with the page's own template, once a second while the tab is visible. Polling
// stops when the tab is hidden and starts again, at once, when it is shown. Without this script the
// page is the same, as of when it was loaded.
//
// Children with data-key are matched by key: unchanged ones are left alone, changed ones replaced,
// new ones inserted, gone ones removed. A child the user is working in (see inUse: e.g. a reject
// reason being typed) is not replaced: only its data-cell parts are.
"use strict";

(() => {
  const PERIOD_MS = 1000;
  const parts = Array.from(document.querySelectorAll("[data-live]"));
  if (parts.length === 0) return;
  let timer = null;
  let running = false;
  let stopped = false;

  // A part the user works in: focus inside, text typed into one of its fields, or the pointer over one
  // of its forms (a button replaced between press and release would lose the click).
  const inUse = (el) => {
    const active = document.activeElement;
    if (active && active !== document.body && el.contains(active)) return true;
    if (Array.from(el.querySelectorAll("form")).some((f) => f.matches(":hover"))) return true;
    return Array.from(el.querySelectorAll("input[type=text], textarea")).some((f) => f.value !== "");
  };

  const updateCells = (current, fresh) => {
    fresh.querySelectorAll("[data-cell]").forEach((cell) => {
      const mine = current.querySelector(`[data-cell="${cell.dataset.cell}"]`);
      if (mine && mine.innerHTML !== cell.innerHTML) mine.innerHTML = cell.innerHTML;
    });
  };

  const merge = (current, fresh) => {
    const keyed = (el) => new Map(Array.from(el.children).filter((c) => c.dataset.key).map((c) => [c.dataset.key, c]));
    const have = keyed(current);
    const wanted = Array.from(fresh.children);
    if (have.size === 0 || wanted.some((c) => !c.dataset.key)) {
      if (current.innerHTML !== fresh.innerHTML && !inUse(current)) current.innerHTML = fresh.innerHTML;
      return;
    }
    let at = current.firstElementChild;
    for (const next of wanted) {
      const mine = have.get(next.dataset.key);
      have.delete(next.dataset.key);
      if (mine === undefined) {
        current.insertBefore(next, at);
        continue;
      }
      if (mine !== at) current.insertBefore(mine, at);
      at = mine.nextElementSibling;
      if (mine.outerHTML === next.outerHTML) continue;
      if (inUse(mine)) updateCells(mine, next);
      else mine.replaceWith(next);
    }
    have.forEach((gone) => { if (!inUse(gone)) gone.remove(); });
  };

  const refresh = async (el) => {
    const response = await fetch(el.dataset.live, {
      credentials: "same-origin", cache: "no-store", headers: { Accept: "text/html" },
    });
    if (response.redirected || response.status === 401 || response.status === 403) {
      stopped = true; // signed out, or the session ended: the next full load says so
      document.documentElement.dataset.live = "stopped";
      return;
    }
    if (!response.ok) return;
    const template = document.createElement("template");
    template.innerHTML = await response.text();
    const fresh = template.content.firstElementChild;
    if (fresh && fresh.id === el.id) merge(el, fresh);
  };

  const tick = async () => {
    timer = null;
    running = true;
    try {
      await Promise.all(parts.map(refresh));
      const root = document.documentElement.dataset;
      root.livePolls = String(Number(root.livePolls || 0) + 1); // how many refreshes: tests read it
    } catch (_) {
      // the server is restarting or the network is away: try again at the next tick
    } finally {
      running = false;
    }
    schedule();
  };

  const schedule = () => {
    if (stopped || timer !== null || running || document.visibilityState !== "visible") return;
    timer = window.setTimeout(tick, PERIOD_MS);
  };

  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") {
      if (timer === null && !running && !stopped) tick();
    } else if (timer !== null) {
      window.clearTimeout(timer);
      timer = null;
    }
  });
  schedule();
})();
