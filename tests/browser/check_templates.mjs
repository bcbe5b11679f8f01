// The example graphs as ComfyUI's real frontend draws them: where every node ends up, and which overlap.
//
// Starts a real ComfyUI (--cpu, on a free 127.0.0.1 port, --base-directory in a temp folder whose
// custom_nodes/ links this pack and whose user settings turn off the first-run dialogs), opens it in
// headless Chromium and loads each workflows/*.json with app.loadGraphData, once in the classic
// canvas (LiteGraph) mode and once with Vue nodes (Comfy.VueNodes.Enabled), where that frontend has
// them. For each node it reads the box the frontend draws (after it has grown the saved size to fit
// the widgets): LiteGraph's boundingRect, title bar included, and in Vue mode also the node's DOM
// rectangle converted to canvas units. Two boxes that share more than a hairline are an overlap: a
// widget of one node is hidden under the other. Prints JSON and exits 1 if any workflow failed to
// load or any two nodes overlap.
//
//   node tests/browser/check_templates.mjs --comfyui DIR [--python PY] [--chromium PATH]
//        [--front-end-root DIR] [--modes litegraph,vue] [--graph PATH ...] [--screenshots DIR] [name ...]
//
// Used by tests/test_comfyui_templates.py (opt-in, `pytest -k comfyui` with COMFYUI_DIR set).
// Needs `npm ci` in tests/browser (playwright-core drives the system Chromium, downloads nothing).

import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { HEADLESS_CHROMIUM_ARGS } from "./headless.mjs";

const HERE = dirname(fileURLToPath(import.meta.url));
const PACK = resolve(HERE, "..", "..");
const PACK_FOLDER = "comfyui-tuner";
const require = createRequire(join(HERE, "package.json"));
const { chromium } = require("playwright-core");

const { values: opts, positionals: only } = parseArgs({
  allowPositionals: true,
  options: {
    comfyui: { type: "string", default: process.env.COMFYUI_DIR || "" },
    python: { type: "string", default: process.env.COMFYUI_PYTHON || "python3" },
    chromium: { type: "string", default: process.env.CHROMIUM || "/usr/bin/chromium" },
    "front-end-root": { type: "string", default: "" },
    modes: { type: "string", default: "litegraph,vue" },
    tolerance: { type: "string", default: "1" },
    graph: { type: "string", multiple: true, default: [] }, // more graphs to load, by path (e.g. an old save)
    screenshots: { type: "string", default: "" }, // a folder: one picture per graph and mode, to look at
  },
});
if (!opts.comfyui) {
  console.error("set --comfyui (or COMFYUI_DIR) to a ComfyUI checkout");
  process.exit(2);
}
const TOLERANCE = Number(opts.tolerance); // canvas units two boxes may share (anti-aliased borders)
const START_TIMEOUT_MS = 240_000;
const SETTINGS = {
  "Comfy.TutorialCompleted": true,
  "Comfy.Minimap.Visible": false,
  "Comfy.Notification.ShowVersionUpdates": false,
  "Comfy.Workflow.ShowMissingModelsWarning": false,
  "Comfy.Workflow.ShowMissingNodesWarning": true,
};

const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));

function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.on("error", fail);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
  });
}

function logTail(path, lines = 40) {
  try {
    return readFileSync(path, "utf8").split("\n").slice(-lines).join("\n");
  } catch {
    return "";
  }
}

async function waitForServer(url, proc, log) {
  const deadline = Date.now() + START_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if (proc.exitCode !== null) throw new Error(`ComfyUI exited with ${proc.exitCode}:\n${logTail(log)}`);
    try {
      const resp = await fetch(`${url}/object_info`, { signal: AbortSignal.timeout(30_000) });
      if (resp.ok) return await resp.json();
    } catch {
      // not up yet
    }
    await sleep(1000);
  }
  throw new Error(`ComfyUI did not answer /object_info within ${START_TIMEOUT_MS / 1000} s:\n${logTail(log)}`);
}

// ------------------------------------------------------------------ in the page
// Every node's drawn box in canvas units: [x, y, w, h], the title bar included.
function drawnBoxes() {
  const canvas = window.app.canvas;
  const ds = canvas.ds;
  const origin = canvas.canvas.getBoundingClientRect();
  const out = [];
  for (const node of window.app.graph._nodes) {
    const rect = node.boundingRect ? [...node.boundingRect] : null;
    const titleHeight = window.LiteGraph.NODE_TITLE_HEIGHT;
    const fromSize = [node.pos[0], node.pos[1] - titleHeight, node.size[0], node.size[1] + titleHeight];
    let dom = null;
    const el = document.querySelector(`[data-node-id="${node.id}"]`);
    if (el) {
      const r = el.getBoundingClientRect();
      if (r.width > 0 && r.height > 0) {
        // screen = (canvas + offset) * scale, relative to the canvas element
        dom = [
          (r.left - origin.left) / ds.scale - ds.offset[0],
          (r.top - origin.top) / ds.scale - ds.offset[1],
          r.width / ds.scale,
          r.height / ds.scale,
        ];
      }
    }
    // the widgets' bottom edge: the last widget must end inside the node
    let widgetsBottom = null;
    for (const w of node.widgets || []) {
      if (w.hidden || w.type === "hidden") continue;
      const y = w.last_y ?? w.y;
      if (typeof y !== "number") continue;
      const h = w.computedHeight ?? (w.computeSize ? w.computeSize(node.size[0])[1] : window.LiteGraph.NODE_WIDGET_HEIGHT);
      widgetsBottom = Math.max(widgetsBottom ?? 0, y + h);
    }
    // text that does not fit its box (a note's or a prompt's): what the scroll bar hides
    let hiddenText = 0;
    const textEls = [];
    for (const w of node.widgets || []) {
      if (w.element) textEls.push(w.element, ...w.element.querySelectorAll("textarea, .tiptap, .ProseMirror"));
    }
    if (el) textEls.push(...el.querySelectorAll("textarea, .tiptap, .ProseMirror"));
    for (const t of textEls) {
      if (t.clientHeight > 0) hiddenText = Math.max(hiddenText, t.scrollHeight - t.clientHeight);
    }
    out.push({
      id: node.id,
      hiddenText,
      values: (node.widgets || []).map((w) => [w.name, w.value]),
      inputs: (node.inputs || []).map((i) => i.name),
      type: node.type,
      title: node.title,
      collapsed: !!node.flags?.collapsed,
      size: [...node.size],
      rect: rect || fromSize,
      dom,
      widgetsBottom,
    });
  }
  return out;
}

function openDialogs() {
  const shown = (el) => {
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== "hidden";
  };
  return [...document.querySelectorAll(".p-dialog, [role=dialog], [role=alertdialog]")]
    .filter(shown)
    .map((d) => d.textContent.trim().slice(0, 300));
}

const frames = (n) =>
  new Promise((ok) => {
    const step = (left) => (left ? requestAnimationFrame(() => step(left - 1)) : ok());
    step(n);
  });

// ------------------------------------------------------------------ geometry
function union(a, b) {
  if (!b) return a;
  const x0 = Math.min(a[0], b[0]);
  const y0 = Math.min(a[1], b[1]);
  return [x0, y0, Math.max(a[0] + a[2], b[0] + b[2]) - x0, Math.max(a[1] + a[3], b[1] + b[3]) - y0];
}

function shared(a, b) {
  const w = Math.min(a[0] + a[2], b[0] + b[2]) - Math.max(a[0], b[0]);
  const h = Math.min(a[1] + a[3], b[1] + b[3]) - Math.max(a[1], b[1]);
  return [w, h];
}

function overlaps(nodes, tolerance = TOLERANCE) {
  const found = [];
  for (let i = 0; i < nodes.length; i++) {
    for (let j = i + 1; j < nodes.length; j++) {
      const [w, h] = shared(nodes[i].box, nodes[j].box);
      if (w > tolerance && h > tolerance) {
        found.push({
          a: `${nodes[i].id} ${nodes[i].title}`,
          b: `${nodes[j].id} ${nodes[j].title}`,
          width: Math.round(w),
          height: Math.round(h),
        });
      }
    }
  }
  return found;
}

// ------------------------------------------------------------------ main
const workflows = readdirSync(join(PACK, "workflows"))
  .filter((f) => f.endsWith(".json"))
  .map((f) => basename(f, ".json"))
  .filter((name) => !only.length || only.includes(name))
  .sort()
  .map((name) => ({ name, path: join(PACK, "workflows", `${name}.json`) }))
  .concat(opts.graph.map((path) => ({ name: basename(path, ".json"), path })));
const modes = opts.modes.split(",").filter(Boolean);

const temp = mkdtempSync(join(tmpdir(), "comfyui-tuner-layout-"));
const base = join(temp, "base");
mkdirSync(join(base, "custom_nodes"), { recursive: true });
symlinkSync(PACK, join(base, "custom_nodes", PACK_FOLDER), "dir");
mkdirSync(join(base, "user", "default"), { recursive: true });
const log = join(temp, "server.log");
const failures = [];
const result = { frontend: null, templates: {} };
let server;
let browser;

const stopServer = async () => {
  if (!server || server.exitCode !== null || server.signalCode !== null) return;
  try {
    process.kill(-server.pid, "SIGTERM");
  } catch {
    return;
  }
  for (let i = 0; i < 50 && server.exitCode === null && server.signalCode === null; i++) await sleep(100);
  if (server.exitCode === null && server.signalCode === null) {
    try {
      process.kill(-server.pid, "SIGKILL");
    } catch {
      // gone
    }
  }
};
process.on("SIGINT", async () => {
  await stopServer();
  rmSync(temp, { recursive: true, force: true });
  process.exit(130);
});

try {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const out = openSync(log, "w");
  const args = ["main.py", "--cpu", "--listen", "127.0.0.1", "--port", String(port), "--base-directory", base];
  if (opts["front-end-root"]) args.push("--front-end-root", opts["front-end-root"]);
  server = spawn(opts.python, args, { cwd: opts.comfyui, stdio: ["ignore", out, out], detached: true });
  server.on("error", (err) => failures.push(`could not start ${opts.python}: ${err.message}`));
  console.error(`ComfyUI (pid ${server.pid}) starting on ${url}, log ${log}`);
  const objectInfo = await waitForServer(url, server, log);

  browser = await chromium.launch({ executablePath: opts.chromium, headless: true, args: HEADLESS_CHROMIUM_ARGS });
  for (const mode of modes) {
    // settings are per user on the server: written before the page loads
    writeFileSync(
      join(base, "user", "default", "comfy.settings.json"),
      JSON.stringify({ ...SETTINGS, "Comfy.VueNodes.Enabled": mode === "vue" }, null, 2),
    );
    const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
    page.setDefaultTimeout(60_000);
    const pageErrors = [];
    page.on("pageerror", (err) => pageErrors.push(err.message));
    await page.goto(`${url}/`, { waitUntil: "load" });
    await page.waitForFunction(() => window.app?.graph && window.app.canvas);
    await page.evaluate(() => document.fonts.ready.then(() => undefined));
    await page.waitForTimeout(1500);
    const info = await page.evaluate(() => ({
      version: window.__COMFYUI_FRONTEND_VERSION__ ?? null,
      vue: !!window.app.ui?.settings?.getSettingValue?.("Comfy.VueNodes.Enabled"),
    }));
    result.frontend = info.version;
    if (mode === "vue" && !info.vue) {
      result[`${mode}Skipped`] = "this frontend has no Vue nodes mode";
      await page.close();
      continue;
    }
    for (const { name, path } of workflows) {
      const graph = JSON.parse(readFileSync(path, "utf8"));
      const missing = [...new Set(graph.nodes.map((n) => n.type))].filter(
        (t) => t !== "Note" && t !== "MarkdownNote" && !(t in objectInfo),
      );
      if (missing.length) {
        failures.push(`${name}: node types missing from this ComfyUI: ${missing.join(", ")}`);
        continue;
      }
      const errorsBefore = pageErrors.length;
      await page.evaluate(async ({ graph, name }) => {
        await window.app.loadGraphData(graph, true, true, name);
      }, { graph, name });
      await page.waitForFunction((count) => window.app.graph._nodes.length === count, graph.nodes.length);
      await page.evaluate(() => window.app.canvas.setDirty(true, true));
      await page.evaluate(frames, 5);
      await page.waitForTimeout(mode === "vue" ? 1500 : 500); // Vue nodes measure themselves, then sync
      await page.evaluate(frames, 3);
      const dialogs = await page.evaluate(openDialogs);
      if (pageErrors.length > errorsBefore) {
        failures.push(`${name} (${mode}): page errors: ${pageErrors.slice(errorsBefore).join(" | ")}`);
      }
      const nodes = (await page.evaluate(drawnBoxes)).map((n) => ({ ...n, box: union(n.rect, n.dom) }));
      const saved = Object.fromEntries(graph.nodes.map((n) => [n.id, n.size]));
      const found = overlaps(nodes.filter((n) => !n.collapsed));
      const hidden = nodes
        .filter((n) => n.hiddenText > 4 && /Note$/.test(n.type))
        .map((n) => `${n.id} ${n.title}: ${Math.round(n.hiddenText)} px of its text is scrolled out of view`);
      // LiteGraph lays widgets out in node.size; Vue nodes size their DOM box to fit (measured above)
      const unfit = nodes
        .filter((n) => mode === "litegraph" && n.widgetsBottom !== null && n.widgetsBottom > n.size[1] + TOLERANCE)
        .map((n) => `${n.id} ${n.title}: widgets end at ${Math.round(n.widgetsBottom)}, node is ${Math.round(n.size[1])} high`);
      (result.templates[name] ??= {})[mode] = {
        dialogs,
        nodes: nodes.map((n) => ({
          id: n.id,
          type: n.type,
          title: n.title,
          saved: saved[n.id],
          drawn: n.box.map((v) => Math.round(v * 10) / 10),
          hiddenText: n.hiddenText,
          values: n.values,
          inputs: n.inputs,
        })),
        overlaps: found,
        unfit,
      };
      if (opts.screenshots) {
        await page.evaluate(() => {
          const canvas = window.app.canvas;
          const [x0, y0, x1, y1] = window.app.graph._nodes.reduce(
            ([a, b, c, d], n) => [Math.min(a, n.pos[0]), Math.min(b, n.pos[1] - 40), Math.max(c, n.pos[0] + n.size[0]), Math.max(d, n.pos[1] + n.size[1])],
            [Infinity, Infinity, -Infinity, -Infinity],
          );
          const { width, height } = canvas.canvas.getBoundingClientRect();
          const scale = Math.min(width / (x1 - x0 + 80), height / (y1 - y0 + 80));
          canvas.ds.scale = scale;
          canvas.ds.offset[0] = width / 2 / scale - (x0 + x1) / 2;
          canvas.ds.offset[1] = height / 2 / scale - (y0 + y1) / 2;
          canvas.setDirty(true, true);
        });
        await page.evaluate(frames, 3);
        await page.waitForTimeout(800);
        mkdirSync(opts.screenshots, { recursive: true });
        await page.screenshot({ path: join(opts.screenshots, `${name} (${mode}).png`) });
      }
      for (const o of found) failures.push(`${name} (${mode}): ${o.a} overlaps ${o.b} by ${o.width}x${o.height}`);
      for (const u of [...unfit, ...hidden]) failures.push(`${name} (${mode}): ${u}`);
    }
    await page.close();
  }
} catch (err) {
  failures.push(`aborted: ${err.stack || err}`);
} finally {
  await browser?.close().catch(() => {});
  await stopServer();
  rmSync(temp, { recursive: true, force: true });
}

// exit only once the whole report is out (a pipe takes 64 KiB at a time)
process.stdout.write(JSON.stringify({ ...result, failures }, null, 2) + "\n", () => process.exit(failures.length ? 1 : 0));
