// Live training panel on MoLE Train Gates: loss and gate-entropy curves, mean gate per expert,
// step/ETA (then the block search's candidates), Cancel / Stop & save / Resume. Fed by mole.progress and mole.job events; after a page
// reload (or a websocket reconnect) it reattaches to the newest job its node started.
import { app } from "../../scripts/app.js";
import { moleApi } from "./mole_api.js";
import { addStyle, chainMethod, el } from "./mole_dom.js";

const NODE = "MoLE_TrainGates";
const WIDGET = "mole_training_panel";
const HEIGHT = 270;
const COLORS = ["#4e79a7", "#e15759", "#59a14f", "#b07aa1", "#f28e2b", "#76b7b2", "#edc948", "#ff9da7"];
const CSS = `
.mole-panel { display: flex; flex-direction: column; gap: 4px; font: 12px sans-serif; color: var(--fg-color, #ddd);
  box-sizing: border-box; padding: 2px 4px; overflow: hidden; }
.mole-panel .mole-head { display: flex; gap: 10px; flex-wrap: wrap; }
.mole-panel .mole-status[data-status=running] { color: #6c6; } .mole-panel .mole-status[data-status=failed] { color: #e66; }
.mole-panel canvas { width: 100%; height: 120px; background: var(--comfy-input-bg, #222); border-radius: 4px; }
.mole-panel .mole-gate { display: grid; grid-template-columns: minmax(60px, 40%) 1fr 44px; gap: 4px; align-items: center; }
.mole-panel .mole-gate .bar { height: 8px; border-radius: 3px; }
.mole-panel .mole-gate .name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.mole-panel .mole-buttons { display: flex; gap: 6px; } .mole-panel button { flex: 1; font-size: 12px; }
.mole-panel .mole-error { color: #e66; min-height: 14px; }`;

/** @type {Set<TrainingPanel>} */
const panels = new Set();

/** @param {number|null|undefined} v @param {number} [digits] */
const fmt = (v, digits = 4) => (typeof v === "number" && Number.isFinite(v) ? v.toPrecision(digits) : "–");

/** A history row with its loss terms (global, local, prior, denoise, balance…) as top-level keys. @param {any} h */
const flat = (h) => ({ ...h, ...(h.terms || {}) });

/** @param {number|null|undefined} s seconds */
const duration = (s) => (typeof s !== "number" ? "" : s < 90 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`);

/** One panel per MoLE Train Gates node. */
class TrainingPanel {
  /** @param {any} node the LiteGraph node */
  constructor(node) {
    this.node = node;
    /** @type {import("./mole_api.js").MoleJob|null} */
    this.job = null;
    /** @type {object[]} */
    this.history = [];
    this.frame = 0;
    this.root = el("div", "mole-panel");
    const head = el("div", "mole-head");
    this.status = head.appendChild(el("span", "mole-status", "no training yet: queue the prompt"));
    this.step = head.appendChild(el("span", "mole-step"));
    this.eta = head.appendChild(el("span", "mole-eta"));
    this.canvas = el("canvas", "mole-curves");
    this.canvas.setAttribute("role", "img");
    this.canvas.setAttribute("aria-label", "training curves: loss and its terms, gate entropy");
    this.gates = el("div", "mole-gates");
    const buttons = el("div", "mole-buttons");
    this.buttons = {};
    for (const [action, label, tip] of [["cancel", "Cancel", "stop at the next step; the checkpoint is kept"],
      ["finish", "Stop & save", "stop at the next step and write the gate file"],
      ["resume", "Resume", "continue from the last checkpoint"]]) {
      const b = buttons.appendChild(el("button", `mole-${action}`, label));
      b.title = tip;
      b.addEventListener("click", () => this.act(action));
      this.buttons[action] = b;
    }
    this.error = el("div", "mole-error");
    this.root.append(head, this.canvas, this.gates, buttons, this.error);
    this.widget = node.addDOMWidget(WIDGET, "mole_panel", this.root,
      { serialize: false, getMinHeight: () => HEIGHT, getMaxHeight: () => HEIGHT });
    this.widget.serialize = false;
    this.render();
  }

  get nodeId() { return String(this.node.id); }

  /** Whether `revision` (of this panel's job) is older than what the panel shows: replies and events can
   * arrive out of order (a Cancel reply saying "running" after the "cancelled" event). */
  stale(id, revision) {
    return this.job?.id === id && revision != null && this.job.revision != null && revision < this.job.revision;
  }

  /**
   * Show a job; a fetched `history` is merged with steps that arrived by event meanwhile. A view older than
   * the one shown (lower `revision`) only contributes its history.
   * @param {import("./mole_api.js").MoleJob} job @param {object[]} [history]
   */
  adopt(job, history) {
    if (!this.job || this.job.id !== job.id) this.history = [];
    if (!this.stale(job.id, job.revision)) this.job = { ...(this.job?.id === job.id ? this.job : {}), ...job };
    if (history) {
      const last = history.at(-1)?.step ?? 0;
      this.history = [...history.map(flat), ...this.history.filter((h) => h.step > last)];
    }
    this.schedule();
  }

  /** Adopt a job by id with its full state (history). @param {string} id */
  async load(id) {
    try {
      const job = await moleApi.job(id);
      this.adopt(job, job.history);
    } catch (e) {
      this.error.textContent = String(e.message || e);
    }
  }

  /** The newest job this node started (after a reload or reconnect). */
  async reattach() {
    try {
      const mine = (await moleApi.listJobs()).filter((j) => j.node === this.nodeId);
      if (mine.length) await this.load(mine[mine.length - 1].id);
    } catch (e) {
      this.error.textContent = `cannot reach the MoLE routes: ${e.message || e}`;
    }
  }

  /** @param {any} p a mole.progress event */
  onProgress(p) {
    const ours = this.job?.id === p.job;
    if (!ours && p.node !== this.nodeId) return;
    if (this.stale(p.job, p.revision)) return;
    if (!ours) { // a job of this node we have not seen yet: show it now, fetch its history and experts
      this.adopt({ id: p.job, name: p.name, status: "running", node: p.node, file: p.file, steps: p.steps });
      this.load(p.job);
    }
    this.job.status = "running";
    this.job.revision = p.revision ?? this.job.revision;
    this.job.progress = p;
    if (p.phase) { // the block search after the last step: progress to show, not a point of the curves
      this.schedule();
      return;
    }
    this.history = this.history.filter((h) => h.step < p.step);
    this.history.push(flat({ step: p.step, loss: p.loss, terms: p.terms, gate_entropy: p.gate_entropy,
      mean_gates: p.mean_gates, mean_gate_entropy: p.mean_gate_entropy }));
    this.schedule();
  }

  /** @param {any} j a mole.job event */
  onJob(j) {
    if (this.job?.id === j.id) this.adopt(j);
    else if (j.node === this.nodeId && j.event === "queued") this.adopt(j, []);
  }

  /** @param {"cancel"|"finish"|"resume"} action */
  async act(action) {
    if (!this.job) return;
    this.error.textContent = "";
    try {
      this.adopt(await moleApi[action](this.job.id));
    } catch (e) {
      this.error.textContent = String(e.message || e);
    }
  }

  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => { this.frame = 0; this.render(); });
  }

  render() {
    const job = this.job;
    const latest = job?.progress || {};
    const p = latest.phase ? this.history.at(-1) || {} : latest; // during the search: the last step's figures
    const status = job?.status;
    if (job) {
      this.status.textContent = `${status}: ${job.file ?? job.name}`;
      this.status.dataset.status = status;
      const terms = Object.entries(p.terms || {}).map(([k, v]) => ` · ${k} ${fmt(v, 3)}`).join("");
      const search = latest.phase === "block_search" ? ` · block search ${latest.candidate}/${latest.candidates}` : "";
      this.step.textContent = `step ${p.step ?? 0}/${job.steps ?? p.steps ?? "?"} · loss ${fmt(p.loss)}${terms}${search}`;
      this.eta.textContent = status === "running" && p.eta_s != null ? `ETA ${duration(p.eta_s)}` : "";
      this.error.textContent = job.error || (status === "cancelled" ? "cancelled: the checkpoint is kept" : "");
    }
    this.buttons.cancel.disabled = !["queued", "running"].includes(status);
    this.buttons.finish.disabled = status !== "running";
    this.buttons.resume.disabled = !(["cancelled", "failed"].includes(status) && job?.resumable !== false);
    this.drawGates(job?.experts || [], p.mean_gates || this.history.at(-1)?.mean_gates || []);
    this.drawCurves();
  }

  /** Mean gate per expert as labelled bars. @param {string[]} names @param {number[]} values */
  drawGates(names, values) {
    this.gates.replaceChildren(...values.map((v, i) => {
      const row = el("div", "mole-gate");
      const name = row.appendChild(el("span", "name", names[i] ?? `expert ${i + 1}`));
      name.title = name.textContent;
      const bar = row.appendChild(el("span", "bar"));
      bar.style.width = `${Math.max(2, Math.round(100 * v))}%`;
      bar.style.background = COLORS[i % COLORS.length];
      row.appendChild(el("span", "value", fmt(v, 3)));
      return row;
    }));
  }

  /** Loss and its terms (top) and gate entropy (bottom) against the step. */
  drawCurves() {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(120, c.clientWidth || 320);
    const h = Math.max(60, c.clientHeight || 120);
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr);
      c.height = Math.round(h * dpr);
    }
    const ctx = c.getContext("2d");
    ctx.save();
    ctx.scale(dpr, dpr);
    ctx.clearRect(0, 0, w, h);
    const first = this.history[0]?.step ?? 0;
    const span = [first, Math.max(first + 1, this.history.at(-1)?.step ?? 1)];
    const terms = [...new Set(this.history.flatMap((r) => Object.keys(r.terms || {})))];
    this.plot(ctx, [0, 0, w, h / 2], terms.length ? `loss = ${terms.join(" + ")}` : "loss",
      [["loss", "#4e79a7"], ...terms.map((k, i) => [k, COLORS[(i + 1) % COLORS.length]])], span);
    this.plot(ctx, [0, h / 2, w, h / 2], "gate entropy (per image, of the mean)",
      [["gate_entropy", "#e15759"], ["mean_gate_entropy", "#59a14f"]], span);
    ctx.restore();
  }

  /**
   * @param {CanvasRenderingContext2D} ctx @param {number[]} box x, y, w, h
   * @param {string} title @param {[string, string][]} series key, colour @param {number[]} span first, last step
   */
  plot(ctx, [x, y, w, h], title, series, [s0, s1]) {
    const values = series.flatMap(([k]) => this.history.map((r) => r[k])).filter(Number.isFinite);
    ctx.fillStyle = "#aaa";
    ctx.font = "10px sans-serif";
    ctx.fillText(title, x + 4, y + 11);
    if (!values.length) return;
    const lo = Math.min(...values);
    const hi = Math.max(...values) > lo ? Math.max(...values) : lo + 1e-6;
    ctx.fillText(fmt(hi, 3), x + w - 44, y + 11);
    ctx.fillText(fmt(lo, 3), x + w - 44, y + h - 3);
    const px = (s) => x + 4 + (w - 52) * ((s - s0) / (s1 - s0));
    const py = (v) => y + 14 + (h - 20) * (1 - (v - lo) / (hi - lo));
    for (const [key, color] of series) {
      ctx.strokeStyle = color;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      let started = false;
      for (const r of this.history) {
        if (!Number.isFinite(r[key])) continue;
        if (started) ctx.lineTo(px(r.step), py(r[key]));
        else ctx.moveTo(px(r.step), py(r[key]));
        started = true;
      }
      ctx.stroke();
    }
  }
}

app.registerExtension({
  name: "mole.TrainingPanel",
  setup() {
    addStyle("mole-training-panel-css", CSS);
    moleApi.onProgress((p) => panels.forEach((panel) => panel.onProgress(p)));
    moleApi.onJob((j) => panels.forEach((panel) => panel.onJob(j)));
    moleApi.onReconnect(() => panels.forEach((panel) => panel.reattach()));
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    chainMethod(nodeType, "onNodeCreated", function () {
      this.molePanel = new TrainingPanel(this);
      panels.add(this.molePanel);
      this.setSize([Math.max(this.size[0], 380), this.computeSize()[1]]);
    });
    chainMethod(nodeType, "onExecuted", function (message) {
      const job = message?.mole_job?.[0];
      if (job && this.molePanel) this.molePanel.load(job.id);
    });
    // loaded from a workflow (also after a page reload)
    chainMethod(nodeType, "onConfigure", function () {
      this.molePanel?.reattach();
    });
    chainMethod(nodeType, "onRemoved", function () {
      panels.delete(this.molePanel);
    });
  },
});
