// The playback side of the web client: an AudioWorkletProcessor reading a bounded ring buffer.
//
// The main thread decodes each binary WebSocket frame to Float32 samples at the stream's rate and posts them
// here ("push"); this processor plays them out, one render quantum (128 frames) at a time. Nothing else
// schedules audio: no chained AudioBufferSourceNodes, so there are no seams between frames and no drift.
//
// Messages from the main thread (in order, through this.port):
//   {type: "push", samples: Float32Array}  audio of the current turn
//   {type: "end", turn}                     the server has sent the turn's last audio (`flushed` / `done`):
//                                           running dry after this is the end of the turn, not an underrun
//   {type: "clear"}                         drop everything buffered now (barge-in)
//   {type: "skip", samples: n}              n samples the main thread dropped unplayed (sent before a `clear`)
//   {type: "resetStats"}                    zero the played / underrun / overflow counters (a new run)
//
// Reports to the main thread, about every REPORT_MS and at once on a state change:
//   {type: "stats", state, consumed, played, buffered, underruns, overflow, peak, drained}
// `drained` names the last turn (the `turn` of its "end") that has played out to its last sample.
// `consumed` is the position in the session's audio timeline (in stream samples) of the next sample to play:
// everything played, cleared or skipped before it. The server's `segment` events are timed on that timeline.

const REPORT_MS = 20;

class RingPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions;
    // The bound: the server paces audio to at most lead_ms ahead of real time, the main thread adds the
    // preroll; the rest is headroom. Overflow drops the oldest samples (counted, never expected).
    this.ring = new Float32Array(opts.capacitySamples);
    this.readIndex = 0;
    this.size = 0;
    this.prerollSamples = opts.prerollSamples;
    // Stream samples per output sample; 1 when the AudioContext runs at the stream's rate (the usual case).
    this.step = opts.streamRate / sampleRate;
    this.frac = 0; // fractional read position between ring[0] and ring[1] (resampling only)

    this.state = "idle"; // idle: nothing to play; buffering: waiting for the preroll; playing
    this.ended = false;
    this.endTurn = null; // the `turn` of the last "end"
    this.drained = null; // the last turn played out
    this.consumed = 0;
    this.played = 0; // stream samples played out
    this.underruns = 0; // render quanta filled (partly or wholly) with silence while playing
    this.overflow = 0; // stream samples dropped because the ring was full
    this.peak = 0; // the loudest output sample since the last report
    this.reportEvery = Math.max(1, Math.round((REPORT_MS / 1000) * sampleRate / 128));
    this.quanta = 0;
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  onMessage(msg) {
    switch (msg.type) {
      case "push":
        this.write(msg.samples);
        this.ended = false;
        if (this.state === "idle") this.setState("buffering");
        break;
      case "end":
        this.ended = true;
        this.endTurn = msg.turn;
        if (this.state === "idle" && this.size === 0) this.playedOut(); // a turn with no audio
        break;
      case "clear":
        this.consumed += this.size;
        this.size = 0;
        this.frac = 0;
        this.ended = false;
        this.setState("idle");
        break;
      case "skip":
        this.consumed += msg.samples;
        break;
      case "resetStats":
        this.played = 0;
        this.underruns = 0;
        this.overflow = 0;
        this.report();
        break;
    }
  }

  write(samples) {
    const cap = this.ring.length;
    const excess = this.size + samples.length - cap;
    if (excess > 0) this.drop(excess); // keep the newest; the timeline stays in order
    let at = (this.readIndex + this.size) % cap;
    for (let i = 0; i < samples.length; i++) {
      this.ring[at] = samples[i];
      at = at + 1 === cap ? 0 : at + 1;
    }
    this.size += samples.length;
  }

  drop(n) {
    const k = Math.min(n, this.size);
    this.readIndex = (this.readIndex + k) % this.ring.length;
    this.size -= k;
    this.consumed += k;
    this.overflow += k;
  }

  at(offset) {
    return this.ring[(this.readIndex + offset) % this.ring.length];
  }

  shift() {
    this.readIndex = this.readIndex + 1 === this.ring.length ? 0 : this.readIndex + 1;
    this.size -= 1;
    this.consumed += 1;
    this.played += 1;
  }

  // Fills `out` from the ring; returns how many output samples were filled.
  fill(out) {
    if (this.step === 1) {
      const n = Math.min(out.length, this.size);
      for (let i = 0; i < n; i++) {
        out[i] = this.ring[this.readIndex];
        this.shift();
      }
      return n;
    }
    // Linear interpolation between ring[0] and ring[1]: a fallback for browsers that refuse an AudioContext at
    // the stream's rate. It needs the next sample too, except for the very last sample of a finished turn.
    let i = 0;
    for (; i < out.length; i++) {
      if (this.size >= 2) {
        out[i] = this.at(0) + (this.at(1) - this.at(0)) * this.frac;
      } else if (this.size === 1 && this.ended) {
        out[i] = this.at(0);
      } else {
        break;
      }
      this.frac += this.step;
      while (this.frac >= 1 && this.size > 0) {
        this.frac -= 1;
        this.shift();
      }
    }
    return i;
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (this.state === "buffering" && (this.size >= this.prerollSamples || this.ended)) {
      this.setState("playing");
    }
    let filled = 0;
    if (this.state === "playing") {
      filled = this.fill(out);
      if (filled < out.length) {
        if (this.ended && this.size === 0) {
          this.playedOut(); // silence from here on is not an underrun
        } else {
          this.underruns += 1;
        }
      }
    }
    out.fill(0, filled);
    for (let i = 0; i < filled; i++) {
      const v = Math.abs(out[i]);
      if (v > this.peak) this.peak = v;
    }
    if (++this.quanta >= this.reportEvery) this.report();
    return true;
  }

  playedOut() {
    this.ended = false;
    this.drained = this.endTurn;
    this.state = "idle";
    this.report();
  }

  setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.report();
  }

  report() {
    this.quanta = 0;
    this.port.postMessage({
      type: "stats",
      state: this.state,
      consumed: this.consumed,
      played: this.played,
      buffered: this.size,
      underruns: this.underruns,
      overflow: this.overflow,
      peak: this.peak,
      drained: this.drained,
    });
    this.peak = 0;
  }
}

registerProcessor("ring-player", RingPlayer);
