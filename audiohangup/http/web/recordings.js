/*
 * The recordings view: GET recordings (newest first, from the call records,
 * each with its size and seconds), searchable by call id, paged with its
 * cursor ("Older"). Play and Download fetch GET calls/{id}/recording with the
 * token in the Authorization header, as every request of the page, and hand
 * the WAV to the <audio> element, or the download, as a blob: URL. The token
 * never goes into a URL (URLs end up in logs, history and Referer headers),
 * and no second kind of credential is minted: the CSP allows media from
 * blob: for this. The file is fetched whole before it plays.
 */
"use strict";

(function () {
  const ah = window.audiohangup;
  const PAGE = 20;
  const body = document.getElementById("recordings-body");
  const form = document.getElementById("recordings-search");
  const player = document.getElementById("player");
  const playing = document.getElementById("player-label");
  const more = document.getElementById("recordings-more");
  let cursor = null;
  let search = null;
  let fetched = null; // {callId, url}: the last WAV fetched, kept for Play then Download (one only: memory)

  function bytes(n) {
    if (typeof n !== "number") return "—";
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} kB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  async function fetchWav(callId) {
    if (fetched && fetched.callId === callId) return fetched.url;
    const response = await ah.api("GET", `calls/${encodeURIComponent(callId)}/recording`, true);
    const type = (response.headers.get("content-type") || "").split(";")[0];
    if (type !== "audio/wav") throw new Error(`the server sent ${type || "no type"}, not audio/wav`);
    const url = URL.createObjectURL(new Blob([await response.arrayBuffer()], { type }));
    if (fetched) URL.revokeObjectURL(fetched.url);
    fetched = { callId, url };
    return url;
  }

  function row(recording) {
    const started = new Date(recording.started_at);
    const play = ah.el("button", { type: "button", class: "play", "data-call-id": recording.call_id, "aria-label": `Play the recording of call ${recording.call_id}` }, "Play");
    const save = ah.el("button", { type: "button", class: "download", "data-call-id": recording.call_id, "aria-label": `Download the recording of call ${recording.call_id}` }, "Download");
    return ah.el(
      "tr",
      { "data-call-id": recording.call_id, "data-file": recording.file },
      ah.el("td", { class: "call" }, ah.el("code", {}, recording.call_id)),
      ah.el("td", {}, ah.el("time", { datetime: recording.started_at }, isNaN(started) ? "—" : ah.clock(started))),
      ah.el("td", { class: "num seconds" }, typeof recording.seconds === "number" ? ah.duration(recording.seconds, true) : "—"),
      ah.el("td", { class: "num size" }, bytes(recording.bytes)),
      ah.el("td", { class: "action" }, play, " ", save),
    );
  }

  async function load(append) {
    let path = `recordings?limit=${PAGE}`;
    if (search) path += `&call_id=${encodeURIComponent(search)}`;
    if (append && cursor) path += `&cursor=${encodeURIComponent(cursor)}`;
    try {
      const page = await ah.api("GET", path);
      const rows = page.recordings.map(row);
      if (append) body.append(...rows);
      else body.replaceChildren(...rows);
      cursor = page.next_cursor;
      more.hidden = !cursor;
      document.getElementById("recordings-empty").hidden = body.children.length > 0;
      ah.setText(document.getElementById("recordings-status"), search ? `Recordings of call ${search}.` : "");
    } catch (error) {
      if (error instanceof ah.AuthNeeded) ah.askToken();
      else ah.setText(document.getElementById("recordings-status"), `Cannot list the recordings: ${error.message}`);
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    search = document.getElementById("recordings-call").value.trim().toLowerCase() || null;
    cursor = null;
    load(false);
  });
  more.addEventListener("click", () => load(true));
  document.getElementById("recordings-refresh").addEventListener("click", () => {
    cursor = null;
    load(false);
  });

  body.addEventListener("click", async (event) => {
    const button = event.target.closest("button");
    if (!button || button.disabled) return;
    const callId = button.dataset.callId;
    button.disabled = true;
    try {
      const url = await fetchWav(callId);
      if (button.classList.contains("play")) {
        player.src = url;
        player.dataset.callId = callId;
        player.hidden = false;
        ah.setText(playing, `Call ${callId}`);
        await player.play().catch(() => {}); // a browser may want another click first: the controls are there
      } else {
        const link = ah.el("a", { href: url, download: `${callId}.wav`, hidden: "" });
        document.body.append(link);
        link.click();
        link.remove();
      }
    } catch (error) {
      if (error instanceof ah.AuthNeeded) ah.askToken();
      else ah.say(`Cannot fetch the recording of call ${callId}: ${error.message}`, true);
    } finally {
      button.disabled = false;
    }
  });

  // Listed once the page is in (a token given), and again on demand.
  let listed = false;
  ah.onCalls(() => {
    if (!listed) {
      listed = true;
      load(false);
    }
  });
})();
