/*
 * audiohangup's listen-in player, an AudioWorklet processor (listen.js loads
 * it from the same origin, as the page's CSP wants). It gets each channel's
 * 20 ms of samples as a Float32Array over its port, at the leg's rate, and
 * plays every channel into every output channel (the parties mixed), at the
 * context's rate. A channel that falls behind by more than MAX_SECONDS drops
 * its oldest audio: the call is live, a delay would only grow.
 */
"use strict";

const MAX_SECONDS = 0.5;

class ListenPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const rates = (options.processorOptions && options.processorOptions.rates) || [8000];
    this.channels = rates.map((rate) => ({ step: rate / sampleRate, queue: [], queued: 0, at: 0, max: rate * MAX_SECONDS }));
    this.port.onmessage = (event) => {
      const channel = this.channels[event.data.channel];
      if (!channel) return;
      channel.queue.push(event.data.samples);
      channel.queued += event.data.samples.length;
      while (channel.queued > channel.max && channel.queue.length > 1) {
        channel.queued -= channel.queue.shift().length;
        channel.at = 0;
      }
    };
  }

  process(inputs, outputs) {
    const output = outputs[0];
    const size = output[0].length;
    for (const channel of this.channels) {
      for (let i = 0; i < size && channel.queue.length; i++) {
        const chunk = channel.queue[0];
        const sample = chunk[Math.floor(channel.at)];
        for (const out of output) out[i] = Math.max(-1, Math.min(1, out[i] + sample));
        channel.at += channel.step;
        if (channel.at >= chunk.length) {
          channel.at -= chunk.length;
          channel.queued -= chunk.length;
          channel.queue.shift();
        }
      }
    }
    return true;
  }
}

registerProcessor("listen-player", ListenPlayer);
