// Gate heatmap on MoLE Visualize Gates: experts × blocks, block labels, the value under the mouse,
// optionally one timestep range at a time. Drawn from the node's `ui.mole_gates` payload
// ({title, experts, blocks, labels, values[expert][block], buckets?, bucket_labels?}).
import { app } from "../../scripts/app.js";
import { addStyle, chainMethod, el } from "./mole_dom.js";

const NODE = "MoLE_VisualizeGates";
const WIDGET = "mole_heatmap";
const PROPERTY = "mole_heatmap"; // the last payload, kept in the workflow so a reload redraws it
const CELL_H = 20;
const MIN_CELL_W = 16;
const FONT = "11px sans-serif";
const CSS = `
.mole-heatmap { position: relative; font: 11px sans-serif; color: var(--fg-color, #ddd); box-sizing: border-box;
  padding: 2px 4px; overflow: hidden; }
.mole-heatmap .mole-title { margin-bottom: 2px; opacity: .85; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; height: 15px; }
.mole-heatmap canvas { display: block; width: 100%; }
.mole-heatmap select { font-size: 11px; margin-bottom: 2px; height: 20px; }
.mole-heatmap .mole-tip { position: absolute; pointer-events: none; background: #000c; color: #fff; padding: 2px 5px;
  border-radius: 3px; white-space: nowrap; display: none; }`;

/** White → deep blue, as the PNG heatmap of mole_core.viz. @param {number} v in [0, 1] */
function ramp(v) {
  const t = Math.min(Math.max(v, 0), 1);
  return `rgb(${Math.round(255 - 215 * t)}, ${Math.round(255 - 175 * t)}, ${Math.round(255 - 75 * t)})`;
}

/** One heatmap per MoLE Visualize Gates node. */
class Heatmap {
  /** @param {any} node */
  constructor(node) {
    this.node = node;
    this.payload = null;
    this.bucket = "";
    this.layout = null;
    this.root = el("div", "mole-heatmap");
    this.title = this.root.appendChild(el("div", "mole-title", "run the graph to see which expert each block uses"));
    this.select = this.root.appendChild(el("select"));
    this.select.title = "timestep range";
    this.select.addEventListener("change", () => { this.bucket = this.select.value; this.draw(); });
    this.canvas = this.root.appendChild(el("canvas"));
    this.canvas.setAttribute("role", "img");
    this.tip = this.root.appendChild(el("div", "mole-tip"));
    this.canvas.addEventListener("mousemove", (e) => this.hover(e));
    this.canvas.addEventListener("mouseleave", () => { this.tip.style.display = "none"; });
    this.widget = node.addDOMWidget(WIDGET, "mole_heatmap", this.root,
      { serialize: false, getMinHeight: () => this.height(), getMaxHeight: () => this.height() });
    this.widget.serialize = false;
    new ResizeObserver(() => this.draw()).observe(this.root);
  }

  /** Widget height for the current payload. */
  height() {
    if (!this.payload) return 40;
    return 30 + (this.payload.buckets ? 22 : 0) + this.labelSpace() + CELL_H * this.payload.experts.length;
  }

  /** Height of the rotated block labels: the widest label in the canvas font. */
  labelSpace() {
    const ctx = this.canvas.getContext("2d");
    ctx.font = FONT;
    return 10 + Math.max(24, ...(this.payload?.labels || []).map((l) => ctx.measureText(l).width));
  }

  /** @param {object} payload */
  set(payload) {
    this.payload = payload;
    this.node.properties[PROPERTY] = payload;
    this.title.textContent = payload.title;
    this.title.title = `${payload.title}${payload.source ? `\n${payload.source}` : ""}`;
    const buckets = Object.keys(payload.buckets || {});
    this.select.style.display = buckets.length ? "" : "none";
    this.select.replaceChildren(el("option", "", "all timesteps"),
      ...buckets.map((b) => el("option", "", payload.bucket_labels?.[b] ?? `bucket ${b}`)));
    [...this.select.options].forEach((o, i) => { o.value = i ? buckets[i - 1] : ""; });
    this.bucket = "";
    const blocks = payload.labels.join(", ");
    this.canvas.setAttribute("aria-label", `gate heatmap; experts: ${payload.experts.join(", ")}; blocks: ${blocks}`);
    const [w, h] = this.node.computeSize();
    this.node.setSize([Math.max(this.node.size[0], w, 120 + MIN_CELL_W * payload.labels.length),
      Math.max(this.node.size[1], h)]);
    this.draw();
  }

  /** @returns {(number|null)[][]} values[expert][block] of the selected timestep range */
  values() {
    return this.bucket ? this.payload.buckets[this.bucket] : this.payload.values;
  }

  draw() {
    const p = this.payload;
    if (!p) return;
    const dpr = window.devicePixelRatio || 1;
    const width = Math.max(160, this.root.clientWidth - 8);
    const ctx = this.canvas.getContext("2d");
    ctx.font = FONT;
    const left = 8 + Math.max(...p.experts.map((e) => ctx.measureText(e).width));
    const cellW = Math.max(MIN_CELL_W, (width - left - 4) / Math.max(1, p.labels.length));
    const height = CELL_H * p.experts.length + this.labelSpace();
    this.canvas.width = Math.round((left + cellW * p.labels.length + 4) * dpr);
    this.canvas.height = Math.round(height * dpr);
    this.canvas.style.width = `${this.canvas.width / dpr}px`;
    this.canvas.style.height = `${height}px`;
    this.layout = { left, cellW };
    ctx.save();
    ctx.scale(dpr, dpr);
    ctx.font = FONT;
    ctx.textBaseline = "middle";
    const values = this.values();
    p.experts.forEach((name, i) => {
      ctx.fillStyle = "#ccc";
      ctx.fillText(name, 2, i * CELL_H + CELL_H / 2);
      p.labels.forEach((_, j) => {
        const v = values[i]?.[j];
        const x = left + j * cellW;
        ctx.fillStyle = v == null ? "#333" : ramp(v);
        ctx.fillRect(x, i * CELL_H, cellW - 1, CELL_H - 1);
        if (v != null && cellW >= 26) {
          ctx.fillStyle = v > 0.55 ? "#fff" : "#000";
          ctx.fillText(v.toFixed(2).replace(/^0/, ""), x + 3, i * CELL_H + CELL_H / 2);
        }
      });
    });
    ctx.fillStyle = "#ccc";
    p.labels.forEach((label, j) => { // vertical block labels under the columns
      ctx.save();
      ctx.translate(left + j * cellW + cellW / 2 + 4, CELL_H * p.experts.length + 4);
      ctx.rotate(Math.PI / 2);
      ctx.fillText(label, 0, 0);
      ctx.restore();
    });
    ctx.restore();
  }

  /** Show "expert · block: value" for the cell under the mouse. @param {MouseEvent} e */
  hover(e) {
    const p = this.payload;
    if (!p || !this.layout) return;
    const r = this.canvas.getBoundingClientRect();
    const scale = r.width / (this.canvas.width / (window.devicePixelRatio || 1)) || 1;
    const x = (e.clientX - r.left) / scale;
    const y = (e.clientY - r.top) / scale;
    const i = Math.floor(y / CELL_H);
    const j = Math.floor((x - this.layout.left) / this.layout.cellW);
    if (i < 0 || i >= p.experts.length || j < 0 || j >= p.labels.length) {
      this.tip.style.display = "none";
      return;
    }
    const v = this.values()[i]?.[j];
    this.tip.textContent = `${p.experts[i]} · ${p.labels[j]} (${p.blocks[j]}): ${v == null ? "not seen" : v.toFixed(4)}`;
    this.tip.style.display = "block";
    const box = this.root.getBoundingClientRect();
    const k = box.width / this.root.offsetWidth || 1; // the canvas zoom scales the widget
    const left = (e.clientX - box.left) / k + 12;
    this.tip.style.left = `${Math.max(0, Math.min(left, this.root.offsetWidth - this.tip.offsetWidth - 2))}px`;
    this.tip.style.top = `${(e.clientY - box.top) / k + 14}px`;
  }
}

app.registerExtension({
  name: "mole.GateHeatmap",
  setup() {
    addStyle("mole-heatmap-css", CSS);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    chainMethod(nodeType, "onNodeCreated", function () {
      this.moleHeatmap = new Heatmap(this);
    });
    chainMethod(nodeType, "onExecuted", function (message) {
      const payload = message?.mole_gates?.[0];
      if (payload && this.moleHeatmap) this.moleHeatmap.set(payload);
    });
    chainMethod(nodeType, "onConfigure", function () {
      const saved = this.properties?.[PROPERTY];
      if (saved && this.moleHeatmap) this.moleHeatmap.set(saved);
    });
  },
});
