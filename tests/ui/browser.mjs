// Drives the real ComfyUI frontend in headless Debian chromium (playwright-core), for tests/ui/test_browser.py.
//   node browser.mjs export <url> <graphs.json> <out dir>   API graphs → UI-format workflows (loadApiJson + serialize)
//   node browser.mjs check  <url> <spec.json>   <out dir>   load workflows, run training, screenshots, results.json
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const [command, url, input, outDir] = process.argv.slice(2);
const LONG = { timeout: 240_000, polling: 200 };

/** Start chromium on the ComfyUI page; returns {context, page, log}. */
async function openPage() {
  // no first-run template dialog
  await fetch(`${url}/settings/Comfy.TutorialCompleted`, { method: "POST", body: "true" });
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "mole-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    headless: true, executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: FLAGS,
    viewport: { width: 1600, height: 1000 },
  });
  const page = context.pages()[0] ?? await context.newPage();
  const log = [];
  page.on("console", (m) => { if (["error", "warning"].includes(m.type())) log.push(`${m.type()}: ${m.text()}`); });
  page.on("pageerror", (e) => log.push(`pageerror: ${e.message}\n${e.stack ?? ""}`));
  await page.goto(url);
  await ready(page);
  return { context, page, log, profile };
}

/** Close chromium and remove its temporary profile (nothing is left in the temp folder). */
async function closePage(context, profile) {
  await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}

async function ready(page) {
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.MoLE_TrainGates
    && document.querySelector("#mole-training-panel-css") && document.querySelector("#mole-heatmap-css"), null, LONG);
}

/** Errors that concern MoLE (the frontend logs its own unrelated 404s and warnings). */
const ours = (log) => log.filter((l) => /mole/i.test(l) && !/^warning/.test(l));

async function exportWorkflows() {
  const graphs = JSON.parse(fs.readFileSync(input, "utf8"));
  const { context, page, log, profile } = await openPage();
  for (const [name, { api, note }] of Object.entries(graphs)) {
    const workflow = await page.evaluate(async ({ api, name, note }) => {
      await window.app.loadApiJson(api, name);
      const graph = window.app.graph;
      // re-stack each column with room for widgets that grow once the graph has run (heatmaps)
      const columns = new Map();
      for (const n of graph.nodes) columns.set(n.pos[0], [...(columns.get(n.pos[0]) ?? []), n]);
      for (const nodes of columns.values()) {
        nodes.sort((a, b) => a.pos[1] - b.pos[1]);
        let y = nodes[0].pos[1];
        for (const n of nodes) {
          n.pos[1] = y;
          y += n.size[1] + 70 + (n.type === "MoLE_VisualizeGates" ? 200 : 0);
        }
      }
      const xs = graph.nodes.map((n) => n.pos[0]);
      const ys = graph.nodes.map((n) => n.pos[1] + n.size[1]);
      const noteNode = window.LiteGraph.createNode("Note");
      noteNode.title = "How to use";
      noteNode.widgets[0].value = note;
      noteNode.pos = [Math.min(...xs), Math.max(...ys) + 60];
      noteNode.size = [520, 200];
      graph.add(noteNode);
      return { ...graph.serialize(), id: crypto.randomUUID() };
    }, { api, name, note });
    fs.writeFileSync(path.join(outDir, `${name}.json`), `${JSON.stringify(workflow, null, 2)}\n`);
  }
  await closePage(context, profile);
  if (ours(log).length) throw new Error(ours(log).join("\n"));
}

/** Load a UI workflow and describe what the frontend made of it. */
async function loadWorkflow(page, workflow, name) {
  return page.evaluate(async ({ workflow, name }) => {
    const linkCount = (g) => (g.links instanceof Map ? g.links.size : Object.keys(g.links ?? {}).length);
    await window.app.loadGraphData(workflow, true, true, name);
    const nodes = window.app.graph.nodes;
    return {
      nodes: nodes.length, expected: workflow.nodes.length,
      links: linkCount(window.app.graph), expectedLinks: workflow.links.length,
      missing: nodes.filter((n) => !window.LiteGraph.registered_node_types[n.type]).map((n) => n.type),
      panels: nodes.filter((n) => n.type === "MoLE_TrainGates").map((n) => !!n.widgets.find((w) => w.name === "mole_training_panel")),
      heatmaps: nodes.filter((n) => n.type === "MoLE_VisualizeGates").map((n) => !!n.widgets.find((w) => w.name === "mole_heatmap")),
    };
  }, { workflow, name });
}

/** Zoom 1 and centre on the first node of a type, so its DOM widgets are on screen. */
async function focus(page, type) {
  await page.evaluate((type) => {
    const node = window.app.graph.nodes.find((n) => n.type === type);
    window.app.canvas.ds.scale = 1;
    window.app.canvas.centerOnNode(node);
    window.app.canvas.setDirty(true, true);
  }, type);
  await page.waitForTimeout(400);
}

/** Non-background pixels of a canvas (a drawn widget has many). */
async function inked(locator) {
  return locator.evaluate((c) => {
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0) n++;
    return { inked: n, width: c.width, height: c.height };
  });
}

const panelState = (page) => page.evaluate(() => {
  const node = window.app.graph.nodes.find((n) => n.type === "MoLE_TrainGates");
  const p = node?.molePanel;
  return p && { status: p.job?.status ?? null, step: p.job?.progress?.step ?? 0, history: p.history.length,
    job: p.job?.id ?? null, text: p.root.innerText };
});

/** Swap node types in the loaded graph (checkpoint → tiny model…), keeping every outgoing link. */
async function substitute(page, replace) {
  await page.evaluate((replace) => {
    const graph = window.app.graph;
    const linkOf = (id) => (graph.links instanceof Map ? graph.links.get(id) : graph.links[id]);
    for (const old of [...graph.nodes]) {
      const r = replace[old.type];
      if (!r) continue;
      const node = window.LiteGraph.createNode(r.type);
      node.pos = [...old.pos];
      graph.add(node);
      for (const [name, value] of Object.entries(r.widgets)) node.widgets.find((w) => w.name === name).value = value;
      node.widgets.find((w) => w.name === "seed").value = old.id;
      old.outputs.forEach((out, slot) => {
        for (const id of [...(out.links ?? [])]) {
          const link = linkOf(id);
          node.connect(slot, graph.getNodeById(link.target_id), link.target_slot);
        }
      });
      graph.remove(old);
    }
  }, replace);
}

async function setWidgets(page, values) {
  await page.evaluate((values) => {
    for (const node of window.app.graph.nodes) {
      for (const [name, value] of Object.entries(values[node.type] ?? {})) {
        const widget = node.widgets.find((w) => w.name === name);
        widget.value = value;
      }
    }
  }, values);
}

async function check() {
  const spec = JSON.parse(fs.readFileSync(input, "utf8"));
  const results = { workflows: {} };
  const { context, page, log, profile } = await openPage();
  for (const [name, workflow] of Object.entries(spec.workflows)) {
    const before = log.length;
    results.workflows[name] = { ...(await loadWorkflow(page, workflow, name)), errors: ours(log.slice(before)) };
    await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.Canvas.FitView"));
    await page.waitForTimeout(300);
    await page.screenshot({ path: path.join(outDir, `workflow_${name}.png`) });
  }
  // run the training workflow on the tiny model (wait mode): panel and heatmap fill in
  await loadWorkflow(page, spec.train.workflow, "tiny training");
  await substitute(page, spec.train.replace);
  await setWidgets(page, spec.train.widgets);
  const t0 = Date.now();
  await page.evaluate(() => window.app.queuePrompt(0, 1));
  await page.waitForFunction(() => window.app.graph.nodes.find((n) => n.type === "MoLE_TrainGates")?.molePanel?.job?.status === "done"
    && window.app.graph.nodes.find((n) => n.type === "MoLE_VisualizeGates")?.moleHeatmap?.payload, null, LONG);
  results.trainSeconds = (Date.now() - t0) / 1000;
  await focus(page, "MoLE_TrainGates");
  const panel = page.locator(".mole-panel").first();
  await panel.screenshot({ path: path.join(outDir, "panel.png") });
  results.panel = { ...(await panelState(page)), canvas: await inked(panel.locator("canvas")),
    gateLabels: await panel.locator(".mole-gate .name").allInnerTexts() };
  await focus(page, "MoLE_VisualizeGates");
  const heat = page.locator(".mole-heatmap").first();
  await heat.screenshot({ path: path.join(outDir, "heatmap.png") });
  const cell = await page.evaluate(() => {
    const h = window.app.graph.nodes.find((n) => n.type === "MoLE_VisualizeGates").moleHeatmap;
    const r = h.canvas.getBoundingClientRect();
    const k = r.width / (h.canvas.width / (window.devicePixelRatio || 1));
    return { x: r.left + (h.layout.left + h.layout.cellW / 2) * k, y: r.top + 10 * k,
      aria: h.canvas.getAttribute("aria-label"), title: h.title.title, experts: h.payload.experts };
  });
  await page.mouse.move(cell.x, cell.y);
  await page.waitForTimeout(200);
  results.heatmap = { ...cell, canvas: await inked(heat.locator("canvas")),
    tooltip: await heat.locator(".mole-tip").innerText() };
  await heat.screenshot({ path: path.join(outDir, "heatmap_hover.png") });
  await page.screenshot({ path: path.join(outDir, "training_graph.png") });

  // a long background job, a page reload mid-training, then Cancel / Resume / Stop & save from the panel
  await setWidgets(page, spec.reattach.widgets);
  await page.evaluate(() => window.app.queuePrompt(0, 1));
  await page.waitForFunction(() => window.app.graph.nodes.find((n) => n.type === "MoLE_TrainGates")?.molePanel?.job?.status === "running"
    && window.app.graph.nodes.find((n) => n.type === "MoLE_TrainGates").molePanel.history.length >= 2, null, LONG);
  const beforeReload = await panelState(page);
  await page.reload();
  await ready(page);
  await page.waitForFunction((id) => window.app.graph.nodes.find((n) => n.type === "MoLE_TrainGates")?.molePanel?.job?.id === id,
    beforeReload.job, LONG);
  // new steps arrive by event; the history before the reload comes with the job's HTTP fetch (later under load)
  await page.waitForFunction((step) => {
    const p = window.app.graph.nodes.find((n) => n.type === "MoLE_TrainGates").molePanel;
    const now = p.job.progress?.step ?? 0;
    return now > step && p.history.length >= now - 1;
  }, beforeReload.step + 1, LONG);
  const afterReload = await panelState(page);
  // a block-search record (after the last step of recipe compose) is shown, not drawn as a step of the curves
  const search = await page.evaluate(() => {
    const p = window.app.graph.nodes.find((n) => n.type === "MoLE_TrainGates").molePanel;
    const history = p.history.length;
    p.onProgress({ phase: "block_search", candidate: 3, candidates: 10, job: p.job.id, node: p.nodeId, revision: p.job.revision });
    p.render();
    return { text: p.step.textContent, historyKept: p.history.length === history };
  });
  await focus(page, "MoLE_TrainGates");
  await page.locator(".mole-panel").first().screenshot({ path: path.join(outDir, "panel_reattached.png") });
  const waitStatus = (status) => page.waitForFunction((s) => window.app.graph.nodes.find((n) => n.type === "MoLE_TrainGates").molePanel.job.status === s, status, LONG);
  await page.locator(".mole-panel .mole-cancel").first().click();
  await waitStatus("cancelled");
  const cancelled = await panelState(page);
  // replies and events can arrive out of order (a loaded server): an older view must not undo "cancelled"
  const staleIgnored = await page.evaluate(() => {
    const p = window.app.graph.nodes.find((n) => n.type === "MoLE_TrainGates").molePanel;
    const revision = p.job.revision;
    p.adopt({ ...p.job, status: "running", revision: revision - 1 });
    p.onProgress({ ...(p.job.progress || {}), job: p.job.id, node: p.nodeId, revision: revision - 1 });
    return { status: p.job.status, revision: p.job.revision, before: revision };
  });
  await page.locator(".mole-panel .mole-resume").first().click();
  await page.waitForFunction((step) => {
    const p = window.app.graph.nodes.find((n) => n.type === "MoLE_TrainGates").molePanel;
    return p.job.status === "running" && (p.job.progress?.step ?? 0) > step;
  }, cancelled.step, LONG);
  await page.locator(".mole-panel .mole-finish").first().click();
  await waitStatus("done");
  results.reattach = { beforeReload, afterReload, search, cancelled, staleIgnored, finished: await panelState(page) };
  await page.locator(".mole-panel").first().screenshot({ path: path.join(outDir, "panel_finished.png") });
  results.errors = ours(log);
  fs.writeFileSync(path.join(outDir, "results.json"), JSON.stringify(results, null, 2));
  await closePage(context, profile);
}

if (command === "export") await exportWorkflows();
else if (command === "check") await check();
else throw new Error(`usage: node browser.mjs export|check <url> <input.json> <out dir>`);
