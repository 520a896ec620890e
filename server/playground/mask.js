// A brush over a picture: what it paints becomes the transparent part of a PNG mask, the region
// /v1/images/edits repaints (OpenAI's rule: fully transparent = repaint, opaque = keep).

const KEY_STEP = 8; // display pixels per arrow key press (×4 with Shift)

export class MaskPainter {
  /** canvas: the visible layer laid over `image` (same box); brushInput: a range input, display px. */
  constructor(canvas, image, brushInput, onChange) {
    this.canvas = canvas;
    this.image = image;
    this.brushInput = brushInput;
    this.onChange = onChange;
    this.paint = document.createElement("canvas"); // opaque strokes, at the picture's own size
    this.painted = false;
    this.last = null;
    this.cursor = null;
    this.penDown = false;
    canvas.addEventListener("pointerdown", (e) => this.down(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    for (const type of ["pointerup", "pointercancel"]) canvas.addEventListener(type, (e) => this.up(e));
    canvas.addEventListener("pointerleave", () => {
      this.cursor = null;
      this.render();
    });
    canvas.addEventListener("keydown", (e) => this.key(e));
  }

  /** Start over on the picture now shown in `image` (its natural size). */
  reset() {
    const w = this.image.naturalWidth || 1;
    const h = this.image.naturalHeight || 1;
    for (const c of [this.canvas, this.paint]) {
      c.width = w;
      c.height = h;
    }
    this.painted = false;
    this.cursor = null;
    this.render();
    this.onChange();
  }

  clear() {
    this.paint.getContext("2d").clearRect(0, 0, this.paint.width, this.paint.height);
    this.painted = false;
    this.render();
    this.onChange();
  }

  /** Display pixels -> picture pixels. */
  scale() {
    const box = this.canvas.getBoundingClientRect();
    return box.width ? this.canvas.width / box.width : 1;
  }

  radius() {
    return (Number(this.brushInput.value) / 2) * this.scale();
  }

  point(e) {
    const box = this.canvas.getBoundingClientRect();
    const s = this.scale();
    return { x: (e.clientX - box.left) * s, y: (e.clientY - box.top) * s };
  }

  stroke(from, to) {
    const g = this.paint.getContext("2d");
    g.strokeStyle = g.fillStyle = "#000";
    g.lineCap = "round";
    g.lineJoin = "round";
    g.lineWidth = 2 * this.radius();
    g.beginPath();
    g.moveTo(from.x, from.y);
    g.lineTo(to.x + 0.01, to.y); // a zero-length line draws no cap
    g.stroke();
    if (!this.painted) {
      this.painted = true;
      this.onChange();
    }
  }

  down(e) {
    e.preventDefault();
    this.canvas.setPointerCapture(e.pointerId);
    this.last = this.point(e);
    this.stroke(this.last, this.last);
    this.render();
  }

  move(e) {
    this.cursor = this.point(e);
    if (this.last) {
      this.stroke(this.last, this.cursor);
      this.last = this.cursor;
    }
    this.render();
  }

  up() {
    this.last = null;
  }

  key(e) {
    const s = this.scale();
    const step = KEY_STEP * (e.shiftKey ? 4 : 1) * s;
    this.cursor = this.cursor || { x: this.canvas.width / 2, y: this.canvas.height / 2 };
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (e.key in moves) {
      const [dx, dy] = moves[e.key];
      const next = {
        x: Math.min(this.canvas.width, Math.max(0, this.cursor.x + dx)),
        y: Math.min(this.canvas.height, Math.max(0, this.cursor.y + dy)),
      };
      if (this.penDown) this.stroke(this.cursor, next);
      this.cursor = next;
    } else if (e.key === " ") {
      this.penDown = !this.penDown; // Space puts the brush down (arrows then paint) or lifts it
      if (this.penDown) this.stroke(this.cursor, this.cursor);
    } else if (e.key === "Enter") {
      this.stroke(this.cursor, this.cursor); // one dab
    } else if (e.key === "[" || e.key === "]") {
      const input = this.brushInput;
      const next = Number(input.value) * (e.key === "]" ? 1.25 : 0.8);
      input.value = String(Math.round(Math.min(Number(input.max), Math.max(Number(input.min), next))));
    } else {
      return;
    }
    e.preventDefault();
    this.render();
  }

  /** The visible layer: the strokes, half transparent, and the brush outline. */
  render() {
    const g = this.canvas.getContext("2d");
    g.clearRect(0, 0, this.canvas.width, this.canvas.height);
    g.globalAlpha = 0.55;
    g.drawImage(this.paint, 0, 0);
    g.globalCompositeOperation = "source-in";
    g.fillStyle = "#ff2d8a";
    g.fillRect(0, 0, this.canvas.width, this.canvas.height);
    g.globalCompositeOperation = "source-over";
    g.globalAlpha = 1;
    if (this.cursor) {
      g.lineWidth = Math.max(1, this.scale());
      g.strokeStyle = "#fff";
      g.beginPath();
      g.arc(this.cursor.x, this.cursor.y, this.radius(), 0, 2 * Math.PI);
      g.stroke();
    }
  }

  /** The mask PNG (a data: URL) at the picture's size: opaque black, transparent where painted. */
  maskDataUrl() {
    const out = document.createElement("canvas");
    out.width = this.paint.width;
    out.height = this.paint.height;
    const g = out.getContext("2d");
    g.fillStyle = "#000";
    g.fillRect(0, 0, out.width, out.height);
    g.globalCompositeOperation = "destination-out";
    g.drawImage(this.paint, 0, 0);
    return out.toDataURL("image/png");
  }
}
