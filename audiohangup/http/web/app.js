/*
 * audiohangup's live calls page. Every second it fetches GET calls and
 * GET legs/ended?limit=20 and shows them in two tables; its buttons POST
 * calls/{id}/hangup, for one role or for the whole call. When the API answers
 * 401 it asks for the token, keeps it in sessionStorage (this tab only) and
 * sends it as "Authorization: Bearer" from then on. Data only ever goes into
 * the page as text (textContent, setAttribute), never as HTML. No framework,
 * no build step, nothing loaded from elsewhere.
 *
 * The features in files of their own (levels.js, charts.js, recordings.js)
 * use what it shares as window.audiohangup: api() (the token included),
 * the DOM helpers and formats, legCell() to add a column to each leg's row,
 * and onCalls() to hear each refresh's calls. They load after this file and
 * register before the first refresh, which waits for DOMContentLoaded.
 */
"use strict";

(function () {
  const POLL_MS = 1000;
  const TIMEOUT_MS = 5000;
  const TOKEN_KEY = "audiohangup.token";
  const CELLS = ["state", "duration", "frames", "queued", "dropped", "dtmf", "streams", "peer"];
  const NUMERIC = new Set(["duration", "frames", "queued", "dropped"]);
  const WARN_REASONS = new Set(["hangup_timeout", "peer_reset", "peer_error", "protocol_error", "uuid_timeout"]);

  const $ = (id) => document.getElementById(id);
  const live = $("live");
  const form = $("token-form");
  const groups = new Map(); // call id -> {tbody, count, button, rows: Map(role -> row)}
  const busy = new WeakSet(); // buttons whose POST has not answered yet

  let timer = null;
  let running = false; // a refresh is in flight
  let again = false; // refresh once more when it lands
  let locked = false; // waiting for a token: no polling
  let lastEnded = null;
  let lastGood = null;
  let pollError = null;
  const legCells = []; // {name, header, create(td, callId, role), update(td, leg)} from the feature files
  const callListeners = []; // called with each refresh's calls

  class AuthNeeded extends Error {}

  // DOM helpers: attributes through setAttribute, children as nodes or text.

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(name, String(value));
    }
    node.append(...children.map((child) => (child instanceof Node ? child : String(child))));
    return node;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  // Insert node as parent's index-th element child, moving it only if it is elsewhere.
  function place(parent, node, index) {
    if (parent.children[index] !== node) parent.insertBefore(node, parent.children[index] || null);
  }

  function say(text, isError) {
    const message = $("message");
    setText(message, text);
    message.classList.toggle("error", Boolean(isError));
  }

  // Formatting

  function clock(date) {
    const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
    return date.toDateString() === new Date().toDateString() ? time : `${date.toLocaleDateString()} ${time}`;
  }

  function duration(seconds, precise) {
    if (typeof seconds !== "number" || !isFinite(seconds)) return "—";
    seconds = Math.max(0, seconds);
    if (seconds < 60) return precise ? `${seconds.toFixed(1)} s` : `${Math.floor(seconds)} s`;
    const whole = Math.floor(seconds);
    const pad = (n) => String(n).padStart(2, "0");
    const h = Math.floor(whole / 3600);
    const m = Math.floor((whole % 3600) / 60);
    return h ? `${h}:${pad(m)}:${pad(whole % 60)}` : `${m}:${pad(whole % 60)}`;
  }

  const count = (n) => Number(n || 0).toLocaleString();
  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

  // The API

  // With raw, the Response itself (a recording), once its status is checked.
  async function api(method, path, raw) {
    const headers = { Accept: raw ? "*/*" : "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    const options = { method, headers, cache: "no-store" };
    if (!raw) options.signal = AbortSignal.timeout(TIMEOUT_MS);
    const response = await fetch(path, options);
    if (raw && response.ok) return response;
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null; // not JSON: a proxy's error page, say
    }
    if (response.status === 401) throw new AuthNeeded("the API needs a token");
    if (!response.ok) {
      const error = body && body.error;
      throw new Error(error ? `${error.message} (${error.code})` : `HTTP ${response.status}`);
    }
    return body;
  }

  async function refresh() {
    if (running) {
      again = true;
      return;
    }
    running = true;
    clearTimeout(timer);
    try {
      const [calls, ended] = await Promise.all([api("GET", "calls"), api("GET", "legs/ended?limit=20")]);
      renderLive(calls.calls);
      renderEnded(ended.legs);
      for (const listener of callListeners) listener(calls.calls);
      lastGood = new Date();
      const legs = calls.calls.reduce((sum, call) => sum + call.legs.length, 0);
      setText($("refreshed"), `Updated ${clock(lastGood)}: ${plural(calls.calls.length, "call")}, ${plural(legs, "leg")}.`);
      $("status").classList.remove("stale");
      if (pollError !== null && $("message").textContent === pollError) say("");
      pollError = null;
    } catch (error) {
      if (error instanceof AuthNeeded) {
        askToken();
      } else {
        pollError = `Cannot refresh: ${error.message}`;
        say(pollError, true);
        setText($("refreshed"), lastGood ? `Last updated ${clock(lastGood)}.` : "Not updated yet.");
        $("status").classList.add("stale");
      }
    } finally {
      running = false;
    }
    if (again) {
      again = false;
      refresh();
    } else if (!locked) {
      timer = setTimeout(refresh, POLL_MS);
    }
  }

  // Live calls: one tbody per call, one row per leg, updated in place so that
  // buttons (and keyboard focus) survive the refreshes.

  function renderLive(calls) {
    const now = Date.now();
    const seen = new Set();
    calls.forEach((call, index) => {
      seen.add(call.call_id);
      let group = groups.get(call.call_id);
      if (!group) {
        group = newGroup(call.call_id);
        groups.set(call.call_id, group);
      }
      place(live, group.tbody, index + 1); // element 0 is the thead
      updateGroup(group, call, now);
    });
    for (const [callId, group] of groups) {
      if (!seen.has(callId)) {
        group.tbody.remove();
        groups.delete(callId);
      }
    }
    $("live-empty").hidden = calls.length > 0;
  }

  function hangupButton(callId, role) {
    const label = role ? `Hang up the ${role} leg of call ${callId}` : `Hang up every leg of call ${callId}`;
    return el(
      "button",
      { type: "button", class: role ? "hangup" : "hangup call", "data-call-id": callId, "data-role": role, "aria-label": label },
      role ? "Hang up" : "Hang up call",
    );
  }

  // Listen-in buttons, from listen.js (loaded first) when it is there.
  const listenButtons = (callId, role) => (window.AudiohangupListen ? [window.AudiohangupListen.button(callId, role)] : []);

  function newGroup(callId) {
    const count = el("span", { class: "count" });
    const button = hangupButton(callId, null);
    const head = el(
      "tr",
      { class: "call", "data-call-id": callId },
      el("th", { scope: "rowgroup", colspan: CELLS.length + legCells.length + 1 }, "Call ", el("code", {}, callId), " ", count),
      el("td", { class: "action" }, ...listenButtons(callId, null), button),
    );
    return { tbody: el("tbody", { "data-call-id": callId }, head), count, button, rows: new Map() };
  }

  function updateGroup(group, call, now) {
    setText(group.count, `(${plural(call.legs.length, "leg")})`);
    const seen = new Set();
    call.legs.forEach((leg, index) => {
      seen.add(leg.role);
      let row = group.rows.get(leg.role);
      if (!row) {
        row = newRow(call.call_id, leg.role);
        group.rows.set(leg.role, row);
      }
      place(group.tbody, row.tr, index + 1); // element 0 is the call's own row
      updateRow(row, leg, now);
    });
    for (const [role, row] of group.rows) {
      if (!seen.has(role)) {
        row.tr.remove();
        group.rows.delete(role);
      }
    }
    group.button.disabled = busy.has(group.button) || !call.legs.some((leg) => leg.state === "live");
  }

  function newRow(callId, role) {
    const cells = {};
    const tr = el("tr", { class: "leg", "data-call-id": callId, "data-role": role }, el("th", { scope: "row" }, role));
    for (const name of CELLS) {
      cells[name] = el("td", { class: NUMERIC.has(name) ? `${name} num` : name });
      tr.append(cells[name]);
    }
    const extra = legCells.map((cell) => {
      const td = el("td", { class: cell.name });
      cell.create(td, callId, role);
      tr.append(td);
      return td;
    });
    const button = hangupButton(callId, role);
    tr.append(el("td", { class: "action" }, ...listenButtons(callId, role), button));
    return { tr, cells, extra, button };
  }

  function updateRow(row, leg, now) {
    const cells = row.cells;
    setText(cells.state, leg.state);
    cells.state.className = `state ${leg.state === "live" ? "live" : "closing"}`;
    setText(cells.duration, duration((now - Date.parse(leg.connected_at)) / 1000, false));
    cells.duration.title = `connected at ${leg.connected_at}`;
    setText(cells.frames, `${count(leg.frames_in)} / ${count(leg.frames_out)}`);
    setText(cells.queued, `${count(leg.queued_ms)} ms`);
    setText(cells.dropped, count(leg.dropped_frames));
    cells.dropped.classList.toggle("warn", leg.dropped_frames > 0);
    setText(cells.dtmf, leg.dtmf || "—");
    const streams = (leg.streams || []).filter((stream) => stream.state !== "ended" && stream.state !== "failed");
    setText(cells.streams, streams.map((stream) => `${stream.protocol} ${stream.mode} (${stream.state})`).join(", ") || "—");
    cells.streams.title = streams.map((stream) => `${stream.stream_id} ${stream.url}`).join("\n");
    setText(cells.peer, leg.peer || "—");
    legCells.forEach((cell, index) => cell.update(row.extra[index], leg));
    row.button.disabled = busy.has(row.button) || leg.state !== "live";
  }

  // Ended legs: a few rows without controls, rebuilt only when they change.

  function renderEnded(legs) {
    const key = JSON.stringify(legs);
    if (key === lastEnded) return;
    lastEnded = key;
    const rows = legs.map((leg) => {
      const ended = new Date(leg.ended_at);
      const kind = leg.reason === "internal_error" ? "bad" : WARN_REASONS.has(leg.reason) ? "warn" : "ok";
      return el(
        "tr",
        { "data-call-id": leg.call_id, "data-role": leg.role, "data-reason": leg.reason },
        el("td", {}, el("code", {}, leg.call_id)),
        el("td", {}, leg.role),
        el("td", { class: `reason ${kind}` }, leg.reason),
        el("td", { class: "cause" }, leg.cause || "—"),
        el("td", {}, el("time", { datetime: leg.ended_at }, isNaN(ended) ? "—" : clock(ended))),
        el("td", { class: "num" }, duration(leg.duration, true)),
      );
    });
    $("ended-body").replaceChildren(...rows);
    $("ended-empty").hidden = legs.length > 0;
  }

  // Hanging up

  live.addEventListener("click", async (event) => {
    const button = event.target.closest("button.hangup");
    if (!button || button.disabled) return;
    const callId = button.dataset.callId;
    const role = button.dataset.role;
    const what = role ? `the ${role} leg of call ${callId}` : `call ${callId}`;
    let path = `calls/${encodeURIComponent(callId)}/hangup`;
    if (role) path += `?role=${encodeURIComponent(role)}`;
    busy.add(button);
    button.disabled = true;
    try {
      const answer = await api("POST", path);
      const results = answer.legs.map((leg) => `${leg.role} ${leg.result.replace(/_/g, " ")}`).join(", ");
      say(`${clock(new Date())}: hang-up of ${what} requested (${results}).`);
    } catch (error) {
      if (error instanceof AuthNeeded) askToken();
      else say(`${clock(new Date())}: could not hang up ${what}: ${error.message}`, true);
    } finally {
      busy.delete(button);
    }
    if (!locked) refresh();
  });

  // The token

  function showForget() {
    $("forget-token").hidden = !sessionStorage.getItem(TOKEN_KEY);
  }

  function askToken() {
    const rejected = Boolean(sessionStorage.getItem(TOKEN_KEY));
    sessionStorage.removeItem(TOKEN_KEY);
    locked = true;
    clearTimeout(timer);
    document.querySelector("main").hidden = true;
    form.hidden = false;
    showForget();
    setText($("refreshed"), "");
    say(rejected ? "The API did not accept that token; enter it again." : "The API needs a token.", true);
    $("token").focus();
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    form.hidden = true;
    document.querySelector("main").hidden = false;
    locked = false;
    showForget();
    say("");
    refresh();
  });

  $("forget-token").addEventListener("click", (event) => {
    event.preventDefault();
    sessionStorage.removeItem(TOKEN_KEY);
    showForget();
    say("Token forgotten.");
    refresh(); // asks for a token again if the server has one
  });

  // What the feature files use.

  window.audiohangup = Object.freeze({
    api,
    AuthNeeded,
    askToken,
    el,
    setText,
    say,
    clock,
    duration,
    count,
    plural,
    // A column of each leg's row, before its actions; its header goes before theirs.
    legCell(cell) {
      legCells.push(cell);
      const actions = live.tHead.rows[0].lastElementChild;
      actions.before(el("th", { scope: "col", class: cell.name }, cell.header));
    },
    onCalls(listener) {
      callListeners.push(listener);
    },
    get locked() {
      return locked;
    },
  });

  document.addEventListener("DOMContentLoaded", () => {
    showForget();
    refresh();
  });
})();
