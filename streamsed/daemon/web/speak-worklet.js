// AudioWorklet for /speak: mixes the microphone down to mono and posts batches of Int16 PCM
// (little-endian, at the AudioContext's own rate: no resampling here, the daemon does it) plus
// the batch's RMS and peak level for the meter.
class PcmBatcher extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.size = Math.max(128, options.processorOptions.batchFrames | 0);
    this.buffer = new Int16Array(this.size);
    this.count = 0;
    this.sumSquares = 0;
    this.peak = 0;
    this.port.onmessage = (message) => {
      if (message.data === "flush") this.flush(true);
    };
  }

  process(inputs) {
    const channels = inputs[0];
    if (channels && channels.length) {
      const frames = channels[0].length;
      const n = channels.length;
      for (let i = 0; i < frames; i++) {
        let sample = 0;
        for (let c = 0; c < n; c++) sample += channels[c][i];
        sample /= n;
        if (sample > 1) sample = 1;
        else if (sample < -1) sample = -1;
        this.sumSquares += sample * sample;
        const magnitude = Math.abs(sample);
        if (magnitude > this.peak) this.peak = magnitude;
        this.buffer[this.count++] = sample < 0 ? sample * 0x8000 : sample * 0x7fff;
        if (this.count === this.size) this.flush(false);
      }
    }
    return true; // keep running while the node exists
  }

  flush(final) {
    const pcm = this.buffer.slice(0, this.count);
    const rms = this.count ? Math.sqrt(this.sumSquares / this.count) : 0;
    this.port.postMessage({ pcm: pcm.buffer, rms, peak: this.peak, flushed: final }, [pcm.buffer]);
    this.count = 0;
    this.sumSquares = 0;
    this.peak = 0;
  }
}

registerProcessor("pcm-batcher", PcmBatcher);
