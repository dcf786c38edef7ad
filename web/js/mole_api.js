// The only client of the MoLE server routes (/mole/…) and websocket events (mole.progress, mole.job).
import { api } from "../../scripts/api.js";

/**
 * A training job as the server describes it (GET /mole/jobs/{id}).
 * @typedef {object} MoleJob
 * @property {string} id
 * @property {string} name
 * @property {"queued"|"running"|"done"|"failed"|"cancelled"} status
 * @property {number} revision  +1 on every change of state or progress (newest view wins)
 * @property {object} progress   last progress record (step, steps, loss, terms, gate_entropy, mean_gates, eta_s)
 * @property {string|null} error
 * @property {string|null} node  id of the MoLE Train Gates node that started it
 * @property {string} file       gate file name in models/mole_gates
 * @property {number} steps
 * @property {string[]} experts
 * @property {boolean} resumable
 * @property {number} created
 * @property {object[]} [history] per-step {step, loss, gate_entropy, mean_gates}
 */

/** @type {Promise<MoleJob[]>|null} */
let listing = null;

/**
 * fetch + JSON with the server's error text on failure.
 * @param {string} path
 * @param {RequestInit} [options]
 * @returns {Promise<any>}
 */
async function request(path, options) {
  const response = await api.fetchApi(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

/** @param {string} id @param {string} action */
const post = (id, action) => request(`/mole/jobs/${encodeURIComponent(id)}/${action}`, { method: "POST" });

export const moleApi = {
  /**
   * Every job, oldest first; concurrent callers (many panels after a reload) share one request.
   * @returns {Promise<MoleJob[]>}
   */
  listJobs() {
    listing ??= request("/mole/jobs").then((b) => b.jobs).finally(() => { listing = null; });
    return listing;
  },
  /** @param {string} id @returns {Promise<MoleJob>} one job with its history */
  job: (id) => request(`/mole/jobs/${encodeURIComponent(id)}`),
  /** @param {string} id stop at the next step, checkpoint kept */
  cancel: (id) => post(id, "cancel"),
  /** @param {string} id stop at the next step and save the gates */
  finish: (id) => post(id, "finish"),
  /** @param {string} id continue a cancelled/failed job from its checkpoint */
  resume: (id) => post(id, "resume"),
  /** @param {(detail: object) => void} fn called once per training step */
  onProgress(fn) { api.addEventListener("mole.progress", (e) => fn(e.detail)); },
  /** @param {(detail: MoleJob & {event: string}) => void} fn called on queued/started/done/failed/cancelled */
  onJob(fn) { api.addEventListener("mole.job", (e) => fn(e.detail)); },
  /** @param {() => void} fn called when the websocket reconnects (the server may have moved on) */
  onReconnect(fn) { api.addEventListener("reconnected", () => fn()); },
};
