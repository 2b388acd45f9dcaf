/*
 * The last hour in four small charts, from GET stats/hour every 10 s: legs
 * started and ended per minute (ended stacked by close reason), live legs
 * and streams, hangup-to-close p50 and p99, stream and webhook failures.
 * Plain SVG made here, with attributes only (the CSP allows no inline
 * style); colours come from style.css by class. Each bar and point carries
 * its minute and value in data-* attributes, and each chart has a table
 * view of its numbers for screen readers (and tests).
 */
"use strict";

(function () {
  const ah = window.audiohangup;
  const SVG = "http://www.w3.org/2000/svg";
  const POLL_MS = 10000;
  const W = 600;
  const H = 150;
  const PAD = { left: 34, right: 6, top: 8, bottom: 20 };
  const section = document.getElementById("hour");
  let timer = null;
  let lastKey = null;

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(name, String(value));
    }
    node.append(...children.map((child) => (child instanceof Node ? child : document.createTextNode(String(child)))));
    return node;
  }

  // A ceiling the axis reads well at: 1, 2, 5, 10, 20, 50...
  function nice(value) {
    if (!(value > 0)) return 1;
    const power = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
    return 10 * power;
  }

  function hhmm(iso) {
    const date = new Date(iso);
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
  }

  // The frame every chart shares: axes, grid, time labels; returns scales.
  function frame(root, minutes, top) {
    const plotW = W - PAD.left - PAD.right;
    const plotH = H - PAD.top - PAD.bottom;
    const step = plotW / minutes.length;
    const x = (index) => PAD.left + index * step;
    const y = (value) => PAD.top + plotH - (value / top) * plotH;
    for (const value of [0, top / 2, top]) {
      root.append(svg("line", { class: "grid", x1: PAD.left, x2: W - PAD.right, y1: y(value), y2: y(value) }));
      const label = Number.isInteger(value) ? String(value) : value.toFixed(1);
      root.append(svg("text", { class: "tick", x: PAD.left - 4, y: y(value) + 4, "text-anchor": "end" }, label));
    }
    minutes.forEach((minute, index) => {
      const last = index === minutes.length - 1;
      if ((index % 15 === 0 && index < minutes.length - 8) || last) {
        const at = last ? { x: x(index) + step, "text-anchor": "end" } : { x: x(index), "text-anchor": "start" };
        root.append(svg("text", { class: "tick", y: H - 5, ...at }, hhmm(minute.start)));
      }
    });
    return { x, y, step, plotH };
  }

  function chart(id, title, minutes, series, kind) {
    const values = [];
    if (kind === "stack") {
      minutes.forEach((_, index) => values.push(series.reduce((sum, s) => sum + (s.values[index] || 0), 0)));
    } else {
      for (const s of series) values.push(...s.values.filter((v) => typeof v === "number"));
    }
    const top = nice(Math.max(0, ...values));
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": `${id}-title`, class: "chart-svg" });
    const { x, y, step } = frame(root, minutes, top);
    if (kind === "stack") {
      minutes.forEach((minute, index) => {
        let base = 0;
        for (const s of series) {
          const value = s.values[index] || 0;
          if (!value) continue;
          const rect = svg("rect", {
            class: `bar ${s.cls}`,
            x: x(index) + 1,
            width: Math.max(1, step - 2),
            y: y(base + value),
            height: y(base) - y(base + value),
            "data-minute": minute.start,
            "data-series": s.key,
            "data-count": value,
          });
          rect.append(svg("title", {}, `${hhmm(minute.start)} ${s.label}: ${value}`));
          root.append(rect);
          base += value;
        }
      });
    } else {
      for (const s of series) {
        let points = [];
        const flush = () => {
          if (points.length > 1) root.append(svg("polyline", { class: `line ${s.cls}`, points: points.join(" ") }));
          points = [];
        };
        minutes.forEach((minute, index) => {
          const value = s.values[index];
          if (typeof value !== "number") {
            flush();
            return;
          }
          const cx = x(index) + step / 2;
          points.push(`${cx.toFixed(1)},${y(value).toFixed(1)}`);
          const dot = svg("circle", {
            class: `dot ${s.cls}`, cx: cx.toFixed(1), cy: y(value).toFixed(1), r: 1.8,
            "data-minute": minute.start, "data-series": s.key, "data-count": value,
          });
          dot.append(svg("title", {}, `${hhmm(minute.start)} ${s.label}: ${value}`));
          root.append(dot);
        });
        flush();
      }
    }
    const legend = ah.el(
      "ul",
      { class: "legend" },
      ...series.map((s) => ah.el("li", {}, ah.el("span", { class: `swatch ${s.cls}`, "aria-hidden": "true" }), s.label)),
    );
    return ah.el(
      "figure",
      { class: "chart", id },
      ah.el("figcaption", { id: `${id}-title` }, title),
      root,
      legend,
    );
  }

  const REASON_CLASS = (reason) => `series-reason-${reason.replace(/[^a-z_]/g, "")}`;

  function render(hour) {
    const minutes = hour.minutes;
    const reasons = [...new Set(minutes.flatMap((m) => Object.keys(m.legs_ended)))].sort();
    const started = { key: "started", label: "started", cls: "series-started", values: minutes.map((m) => m.legs_started) };
    const ended = reasons.map((reason) => ({
      key: reason, label: `ended: ${reason}`, cls: REASON_CLASS(reason), values: minutes.map((m) => m.legs_ended[reason] || 0),
    }));
    const charts = [
      chart("chart-started", "Legs started per minute", minutes, [started], "stack"),
      chart("chart-ended", "Legs ended per minute, by reason", minutes, ended.length ? ended : [{ key: "none", label: "none ended", cls: "series-none", values: [] }], "stack"),
      chart("chart-live", "Live legs and streams (highest in the minute)", minutes, [
        { key: "live_legs", label: "live legs", cls: "series-legs", values: minutes.map((m) => m.live_legs.max) },
        { key: "streams", label: "streams", cls: "series-streams", values: minutes.map((m) => m.streams.max) },
      ], "lines"),
      chart("chart-close", "Hangup to close, ms (p50, p99)", minutes, [
        { key: "p50", label: "p50", cls: "series-p50", values: minutes.map((m) => m.hangup_to_close_ms.p50) },
        { key: "p99", label: "p99", cls: "series-p99", values: minutes.map((m) => m.hangup_to_close_ms.p99) },
      ], "lines"),
      chart("chart-failures", "Stream and webhook failures per minute", minutes, [
        { key: "stream_failures", label: "stream failures", cls: "series-stream-failures", values: minutes.map((m) => m.stream_failures) },
        { key: "webhook_failures", label: "webhook failures", cls: "series-webhook-failures", values: minutes.map((m) => m.webhook_failures) },
      ], "stack"),
    ];
    document.getElementById("charts").replaceChildren(...charts);
    document.getElementById("hour-updated").textContent = `Minutes to ${hhmm(minutes[minutes.length - 1].start)}, updated ${ah.clock(new Date())}.`;
  }

  let polling = false;

  async function poll() {
    clearTimeout(timer);
    if (polling) return;
    polling = true;
    if (!ah.locked) {
      try {
        const hour = await ah.api("GET", "stats/hour");
        const key = JSON.stringify(hour.minutes);
        if (key !== lastKey) {
          lastKey = key;
          render(hour);
        }
        section.classList.remove("stale");
      } catch (error) {
        if (error instanceof ah.AuthNeeded) ah.askToken();
        else {
          ah.setText(document.getElementById("hour-updated"), `Cannot load the last hour: ${error.message}`);
          section.classList.add("stale");
        }
      }
    }
    polling = false;
    timer = setTimeout(poll, POLL_MS);
  }

  document.getElementById("hour-refresh").addEventListener("click", () => poll());
  document.addEventListener("DOMContentLoaded", () => poll());
  // The calls came (a token was just given, say): the hour too, if it has not yet.
  ah.onCalls(() => {
    if (lastKey === null && !polling) poll();
  });
})();
