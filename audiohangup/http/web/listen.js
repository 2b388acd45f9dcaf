/*
 * Listen-in for audiohangup's live page. app.js puts the button this file
 * makes (window.AudiohangupListen.button) in each leg's row and each call's.
 * Pressing it POSTs calls/{id}/listen (?role=) with the tab's token for a
 * ticket, good once for a few seconds, then opens the WebSocket it names: a
 * browser cannot send a token on a WebSocket. The server sends a "start"
 * message naming the channels and their rates, then 20 ms of signed 16-bit
 * little-endian PCM per binary message (byte 0: the channel, byte 1: zero),
 * played by an AudioWorklet (listen-worklet.js), then "stop" with a reason.
 *
 * The bar at the top says what is heard, each party's level, and how it
 * ended; its data-state, data-bytes and data-level attributes say the same
 * for scripts. One listen-in at a time; Stop, or closing the tab, ends it.
 */
"use strict";

(function () {
  const TOKEN_KEY = "audiohangup.token";
  const LEVEL_MS = 200; // the level shown: the loudest 20 ms of the last 200

  let session = null;

  // The bar: made here, so the page's markup needs only the script.
  const text = document.createElement("span");
  text.className = "listen-text";
  const levels = document.createElement("span");
  levels.className = "listen-levels";
  const stopButton = document.createElement("button");
  stopButton.type = "button";
  stopButton.className = "listen-stop";
  stopButton.textContent = "Stop listening";
  const bar = document.createElement("div");
  bar.id = "listen-bar";
  bar.setAttribute("role", "status");
  bar.setAttribute("aria-live", "polite");
  bar.dataset.state = "idle";
  bar.hidden = true;
  bar.append(text, " ", levels, " ", stopButton);
  stopButton.addEventListener("click", () => stop("stopped"));

  function attach() {
    const header = document.querySelector("header");
    if (header) header.after(bar);
    else document.body.prepend(bar);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", attach);
  else attach();

  function show(state, message) {
    bar.hidden = false;
    bar.dataset.state = state;
    text.textContent = message;
    stopButton.hidden = state !== "connecting" && state !== "listening";
    bar.classList.toggle("error", state === "refused" || state === "failed");
    for (const button of document.querySelectorAll("button.listen")) {
      const mine = session && session.key === button.dataset.key && (state === "connecting" || state === "listening");
      button.setAttribute("aria-pressed", mine ? "true" : "false");
      button.textContent = mine ? "Listening" : "Listen";
    }
  }

  function describe(callId, role) {
    return role ? `the ${role} leg of call ${callId}` : `call ${callId} (both parties)`;
  }

  function button(callId, role) {
    const node = document.createElement("button");
    node.type = "button";
    node.className = role ? "listen" : "listen call";
    // Not data-call-id and data-role: those name the hang-up buttons.
    node.dataset.listenCall = callId;
    if (role) node.dataset.listenRole = role;
    node.dataset.key = `${callId}/${role || ""}`;
    node.setAttribute("aria-pressed", "false");
    node.setAttribute("aria-label", `Listen to ${describe(callId, role)}`);
    node.textContent = "Listen";
    node.addEventListener("click", () => {
      if (session && session.key === node.dataset.key) stop("stopped");
      else start(callId, role || null, node.dataset.key);
    });
    return node;
  }

  async function start(callId, role, key) {
    stop(null);
    const what = describe(callId, role);
    // Made in the click, so that the browser lets it play.
    const context = new AudioContext();
    const mine = { key, callId, role, context, socket: null, node: null, bytes: 0, peaks: [], ended: false };
    session = mine;
    show("connecting", `Connecting to ${what}…`);
    let answer;
    try {
      await context.audioWorklet.addModule("static/listen-worklet.js");
      answer = await ticket(callId, role);
    } catch (error) {
      if (session === mine) finish(mine, "refused", `Cannot listen to ${what}: ${error.message}`);
      return;
    }
    if (session !== mine) return; // stopped, or another one started, meanwhile
    const url = new URL(answer.path, document.baseURI);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    mine.socket = socket;
    let stopReason = null;
    socket.onmessage = (event) => {
      if (session !== mine) return;
      if (typeof event.data === "string") {
        const message = JSON.parse(event.data);
        if (message.event === "start") begin(mine, message, what);
        else if (message.event === "stop") stopReason = message.reason;
        return;
      }
      heard(mine, event.data);
    };
    socket.onclose = (event) => {
      if (session !== mine) return;
      const why = stopReason || event.reason || (event.code === 1006 ? "the connection was lost" : `code ${event.code}`);
      finish(mine, stopReason || event.code === 1000 ? "ended" : "failed", `Listening to ${what} ended: ${why}.`);
    };
  }

  async function ticket(callId, role) {
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    let path = `calls/${encodeURIComponent(callId)}/listen`;
    if (role) path += `?role=${encodeURIComponent(role)}`;
    const response = await fetch(path, { method: "POST", headers, cache: "no-store", signal: AbortSignal.timeout(5000) });
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    const error = body && body.error;
    if (response.status === 403 && error && error.code === "forbidden") {
      throw new Error(`this token may not listen in: it needs the listen scope (or control). ${error.message}.`);
    }
    if (!response.ok) throw new Error(error ? `${error.message} (${error.code})` : `HTTP ${response.status}`);
    return body;
  }

  function begin(mine, message, what) {
    mine.channels = message.channels;
    mine.peaks = message.channels.map(() => []);
    mine.node = new AudioWorkletNode(mine.context, "listen-player", {
      numberOfInputs: 0,
      outputChannelCount: [2],
      processorOptions: { rates: message.channels.map((channel) => channel.rate) },
    });
    mine.analyser = mine.context.createAnalyser();
    mine.node.connect(mine.analyser);
    mine.analyser.connect(mine.context.destination);
    mine.context.resume();
    show("listening", `Listening to ${what}.`);
  }

  function heard(mine, data) {
    if (!mine.node || data.byteLength < 4) return;
    const index = new Uint8Array(data, 0, 1)[0];
    const pcm = new DataView(data, 2);
    const samples = new Float32Array(pcm.byteLength >> 1);
    let power = 0;
    for (let i = 0; i < samples.length; i++) {
      const value = pcm.getInt16(i * 2, true) / 32768;
      samples[i] = value;
      power += value * value;
    }
    const rms = Math.sqrt(power / Math.max(1, samples.length));
    mine.bytes += pcm.byteLength;
    mine.node.port.postMessage({ channel: index, samples }, [samples.buffer]); // samples is empty after this
    const peaks = mine.peaks[index];
    if (!peaks) return;
    peaks.push(rms);
    if (peaks.length > LEVEL_MS / 20) peaks.shift();
    const decibels = mine.peaks.map((list) => (list.length ? 20 * Math.log10(Math.max(...list, 1e-5)) : -100));
    bar.dataset.bytes = String(mine.bytes);
    bar.dataset.level = Math.max(...decibels).toFixed(1);
    levels.textContent = mine.channels
      .map((channel, i) => `${channel.role} ${decibels[i] <= -99 ? "silent" : `${Math.round(decibels[i])} dBFS`}`)
      .join(" · ");
  }

  function stop(why) {
    const mine = session;
    if (!mine) return;
    finish(mine, "ended", why ? `Listening to ${describe(mine.callId, mine.role)} ${why}.` : null);
  }

  function finish(mine, state, message) {
    if (session === mine) session = null;
    if (mine.ended) return;
    mine.ended = true;
    if (mine.socket && mine.socket.readyState <= WebSocket.OPEN) mine.socket.close(1000, "stopped in the page");
    if (mine.node) mine.node.disconnect();
    mine.context.close();
    if (message !== null) show(state, message);
  }

  // Closing the tab closes the WebSocket anyway; saying so is quicker for the server.
  window.addEventListener("pagehide", () => stop(null));

  window.AudiohangupListen = { button };
})();
