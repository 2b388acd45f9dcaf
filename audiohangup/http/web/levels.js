/*
 * Level meters: a column of each leg's row with its audio level in (what the
 * party says) and out (what it is sent), in dBFS as GET calls gives them
 * (the loudest of the last second's samples), and how long ago it last had
 * voice. Native <meter> elements: no inline style, nothing drawn by hand.
 */
"use strict";

(function () {
  const ah = window.audiohangup;
  const FLOOR = -60; // dBFS at the meter's left end; quieter reads as empty
  const VOICE = -45; // what the server calls voice (audiohangup.levels.VOICE_DBFS)

  function meter(direction, callId, role) {
    const label = `${direction === "in" ? "Level from" : "Level to"} the ${role} leg of call ${callId}`;
    return ah.el("meter", {
      class: `level ${direction}`,
      min: FLOOR,
      max: 0,
      low: VOICE,
      high: -6,
      optimum: -20,
      value: FLOOR,
      "aria-label": label,
    });
  }

  function show(node, text, dbfs) {
    node.meter.value = dbfs === null ? FLOOR : Math.max(FLOOR, dbfs);
    node.meter.dataset.dbfs = dbfs === null ? "" : String(dbfs);
    node.meter.title = dbfs === null ? "no audio yet" : `${dbfs.toFixed(1)} dBFS`;
    ah.setText(node.text, text);
  }

  ah.legCell({
    name: "levels",
    header: "Level in / out",
    create(td, callId, role) {
      const parts = {};
      for (const direction of ["in", "out"]) {
        const text = ah.el("span", { class: "dbfs" });
        const node = { meter: meter(direction, callId, role), text };
        parts[direction] = node;
        td.append(ah.el("span", { class: `meter ${direction}` }, ah.el("span", { class: "arrow", "aria-hidden": "true" }, direction === "in" ? "↑" : "↓"), node.meter, text));
      }
      parts.voice = ah.el("span", { class: "voice" });
      td.firstElementChild.append(parts.voice); // beside the level in: the party's own voice
      td.levels = parts;
    },
    update(td, leg) {
      const parts = td.levels;
      for (const [direction, value] of [["in", leg.level_in_dbfs], ["out", leg.level_out_dbfs]]) {
        const dbfs = typeof value === "number" ? value : null;
        show(parts[direction], dbfs === null ? "—" : `${Math.round(dbfs)} dB`, dbfs);
      }
      const voiceAt = leg.voice_at ? Date.parse(leg.voice_at) : NaN;
      let text = "no voice yet";
      if (!isNaN(voiceAt)) {
        const ago = Math.max(0, (Date.now() - voiceAt) / 1000);
        text = ago < 1.5 ? "speaking" : `voice ${ah.duration(ago, false)} ago`;
      }
      ah.setText(parts.voice, text);
      parts.voice.classList.toggle("speaking", text === "speaking");
      parts.voice.title = leg.voice_at ? `last voice at ${leg.voice_at}` : "";
    },
  });
})();
