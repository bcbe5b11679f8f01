// Thumbnails of the example graphs: workflows/<name>.jpg for each workflows/<name>.json.
//
// ComfyUI lists the pack's workflows/*.json under Templates -> comfyui-tuner and shows
// workflows/<name>.jpg as each one's picture. These are screenshots of the graphs as ComfyUI's own
// frontend draws them: the script starts a real ComfyUI (--cpu, on a free 127.0.0.1 port, with
// --base-directory in a temp folder whose custom_nodes/ links this pack and whose user settings turn
// off the first-run templates dialog, the minimap and the canvas menus), opens it in headless
// Chromium at 1280x800 (device scale 2), loads each workflow with app.loadGraphData, checks that
// every node type exists and that no dialog is open, fits the view to the graph (nodes and groups,
// with the text drawn at every zoom), screenshots the canvas area (without the sidebar and top
// bar), and writes a 512 px wide JPEG (quality 80) with Pillow. It stops the server and removes its
// temp folders at the end, and exits 1 if any workflow failed.
//
//   COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/ComfyUI/venv/bin/python \
//     node scripts/make_workflow_thumbnails.mjs [name ...] [--out-dir workflows] [--chromium /usr/bin/chromium]
//
// COMFYUI_DIR: a ComfyUI checkout (outside this repository; nothing of it is copied here).
// COMFYUI_PYTHON: the interpreter with ComfyUI's requirements, its frontend package included; it
// also does the resizing (Pillow is one of ComfyUI's requirements), or set PIL_PYTHON.
// Names (workflow file stems) limit the run to those workflows. Needs `npm ci` in tests/browser
// (playwright-core, which drives the system Chromium and downloads nothing). After a change to a
// workflow, rerun this and look at the pictures; tests/test_nodes_workflows.py checks that each
// workflow has one.

import { spawn, spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { HEADLESS_CHROMIUM_ARGS } from "../tests/browser/headless.mjs";

const PACK = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const PACK_FOLDER = "comfyui-tuner";
const require = createRequire(join(PACK, "tests", "browser", "package.json"));
const { chromium } = require("playwright-core");

const { values: opts, positionals: only } = parseArgs({
  allowPositionals: true,
  options: {
    "out-dir": { type: "string", default: join(PACK, "workflows") },
    chromium: { type: "string", default: process.env.CHROMIUM || "/usr/bin/chromium" },
    width: { type: "string", default: "512" },
    quality: { type: "string", default: "80" },
  },
});
const COMFYUI_DIR = process.env.COMFYUI_DIR;
const COMFYUI_PYTHON = process.env.COMFYUI_PYTHON || "python3";
const PIL_PYTHON = process.env.PIL_PYTHON || COMFYUI_PYTHON;
if (!COMFYUI_DIR) {
  console.error("set COMFYUI_DIR to a ComfyUI checkout (and COMFYUI_PYTHON to its interpreter)");
  process.exit(2);
}

const VIEWPORT = { width: 1280 + 64, height: 800 + 56 };
// the canvas area shot: right of the sidebar (56 px wide), below the floating top bar (52 px high)
const CLIP = { x: 64, y: 56, width: 1280, height: 800 };
const MARGIN = 24; // CSS px of canvas around the graph
const START_TIMEOUT_MS = 240_000;
const SETTINGS = {
  "Comfy.TutorialCompleted": true, // else the templates dialog opens on the first visit
  "Comfy.Minimap.Visible": false,
  "Comfy.Graph.CanvasMenu": false,
  "Comfy.Graph.CanvasInfo": false,
  "Comfy.Notification.ShowVersionUpdates": false,
  // the example graphs name model files that this server does not have; say nothing about them
  "Comfy.Workflow.ShowMissingModelsWarning": false,
  "Comfy.Workflow.ShowMissingNodesWarning": true, // a missing node is an error: the check below fails
  "Comfy.Workflow.WorkflowTabsPosition": "Sidebar",
  "LiteGraph.Canvas.MinFontSizeForLOD": 0, // draw titles, widgets and text at every zoom level
};

const PIL_RESIZE = `
import sys
from PIL import Image
src, dst, width, quality = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
im = Image.open(src).convert("RGB")
height = round(im.height * width / im.width)
im.resize((width, height), Image.LANCZOS).save(dst, "JPEG", quality=quality, optimize=True, progressive=True)
print(width, height)
`;

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

const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));

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
// The graph's bounds (nodes with their titles, and groups) in canvas units.
function fitGraph({ clip, margin }) {
  const canvas = window.app.canvas;
  const items = [...canvas.graph._nodes, ...(canvas.graph._groups || canvas.graph.groups || [])];
  let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
  for (const item of items) {
    const [x, y, w, h] = item.boundingRect;
    x0 = Math.min(x0, x);
    y0 = Math.min(y0, y);
    x1 = Math.max(x1, x + w);
    y1 = Math.max(y1, y + h);
  }
  const ds = canvas.ds;
  const scale = Math.min((clip.width - 2 * margin) / (x1 - x0), (clip.height - 2 * margin) / (y1 - y0));
  ds.scale = scale;
  // screen = (canvas + offset) * scale: the graph's centre on the clip's centre
  ds.offset[0] = (clip.x + clip.width / 2) / scale - (x0 + x1) / 2;
  ds.offset[1] = (clip.y + clip.height / 2) / scale - (y0 + y1) / 2;
  canvas.setDirty(true, true);
  return { scale, bounds: [x0, y0, x1 - x0, y1 - y0], nodes: canvas.graph._nodes.length };
}

// Open dialogs and toasts: their text (toasts are closed).
function openPopups() {
  const shown = (el) => {
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== "hidden";
  };
  const dialogs = [...document.querySelectorAll(".p-dialog, [role=dialog], [role=alertdialog]")].filter(shown);
  const toasts = [...document.querySelectorAll(".p-toast-message")].filter(shown);
  for (const toast of toasts) toast.querySelector(".p-toast-close-button")?.click();
  return {
    dialogs: dialogs.map((d) => d.textContent.trim().slice(0, 300)),
    toasts: toasts.map((t) => t.textContent.trim().slice(0, 300)),
  };
}

const frames = (n) =>
  new Promise((ok) => {
    const step = (left) => (left ? requestAnimationFrame(() => step(left - 1)) : ok());
    step(n);
  });

// ------------------------------------------------------------------ main
const workflows = readdirSync(join(PACK, "workflows"))
  .filter((f) => f.endsWith(".json"))
  .map((f) => basename(f, ".json"))
  .filter((name) => !only.length || only.includes(name))
  .sort();
if (!workflows.length) {
  console.error(`no workflows matched ${JSON.stringify(only)}`);
  process.exit(2);
}

const temp = mkdtempSync(join(tmpdir(), "comfyui-tuner-thumbs-"));
const base = join(temp, "base");
mkdirSync(join(base, "custom_nodes"), { recursive: true });
symlinkSync(PACK, join(base, "custom_nodes", PACK_FOLDER), "dir");
mkdirSync(join(base, "user", "default"), { recursive: true });
writeFileSync(join(base, "user", "default", "comfy.settings.json"), JSON.stringify(SETTINGS, null, 2));
// the model files the graphs' stock loaders name (properties.models) and the images they load, as
// empty placeholders: the frontend then draws the loaders as ready instead of outlining them as missing
const PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
for (const name of workflows) {
  const graph = JSON.parse(readFileSync(join(PACK, "workflows", `${name}.json`), "utf8"));
  for (const node of graph.nodes) {
    for (const model of node.properties?.models ?? []) {
      mkdirSync(join(base, "models", model.directory), { recursive: true });
      writeFileSync(join(base, "models", model.directory, model.name), "");
    }
    if (node.type === "LoadImage") {
      mkdirSync(join(base, "input"), { recursive: true });
      writeFileSync(join(base, "input", node.widgets_values[0]), Buffer.from(PNG_1PX, "base64"));
    }
  }
}
const log = join(temp, "server.log");
const profile = join(temp, "chromium-profile");
mkdirSync(profile);
mkdirSync(opts["out-dir"], { recursive: true });

const failures = [];
const written = [];
let server;
let context;
const cleanup = () => {
  if (server && server.exitCode === null) {
    try {
      process.kill(-server.pid, "SIGTERM"); // its process group: started detached below
    } catch {
      // already gone
    }
  }
};
process.on("SIGINT", () => {
  cleanup();
  rmSync(temp, { recursive: true, force: true });
  process.exit(130);
});

try {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const out = openSync(log, "w");
  server = spawn(
    COMFYUI_PYTHON,
    ["main.py", "--cpu", "--listen", "127.0.0.1", "--port", String(port), "--base-directory", base,
      "--database-url", "sqlite:///:memory:"],
    { cwd: COMFYUI_DIR, stdio: ["ignore", out, out], detached: true },
  );
  server.on("error", (err) => failures.push(`could not start ${COMFYUI_PYTHON}: ${err.message}`));
  console.error(`ComfyUI (pid ${server.pid}) starting on ${url}, log ${log}`);
  const objectInfo = await waitForServer(url, server, log);
  const ours = Object.entries(objectInfo).filter(([, info]) => info.python_module === `custom_nodes.${PACK_FOLDER}`);
  if (!ours.length) throw new Error(`the pack's nodes are not in /object_info:\n${logTail(log)}`);

  context = await chromium.launchPersistentContext(profile, {
    executablePath: opts.chromium,
    headless: true,
    timeout: 60_000,
    args: HEADLESS_CHROMIUM_ARGS,
    viewport: VIEWPORT,
    deviceScaleFactor: 2,
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(60_000);
  const pageErrors = [];
  page.on("pageerror", (err) => pageErrors.push(err.message));
  await page.goto(`${url}/`, { waitUntil: "load" });
  await page.waitForFunction(() => window.app?.graph && window.app.canvas && window.app.extensionManager?.command);
  await page.evaluate(() => document.fonts.ready.then(() => undefined));
  await page.waitForTimeout(2000);
  const first = await page.evaluate(openPopups);
  if (first.dialogs.length) throw new Error(`a dialog is open after start: ${JSON.stringify(first.dialogs)}`);

  for (const name of workflows) {
    const graph = JSON.parse(readFileSync(join(PACK, "workflows", `${name}.json`), "utf8"));
    const missing = [...new Set(graph.nodes.map((n) => n.type))].filter(
      (type) => type !== "Note" && type !== "MarkdownNote" && !(type in objectInfo),
    );
    if (missing.length) {
      failures.push(`${name}: node types missing from this ComfyUI: ${missing.join(", ")}`);
      continue;
    }
    const errorsBefore = pageErrors.length;
    await page.evaluate(async ({ graph, name }) => {
      await window.app.loadGraphData(graph, true, true, name);
    }, { graph, name });
    await page.waitForFunction(
      (count) => window.app.graph._nodes.length === count,
      graph.nodes.length,
    );
    await page.waitForTimeout(1000);
    const popups = await page.evaluate(openPopups);
    if (popups.dialogs.length) {
      failures.push(`${name}: a dialog is open: ${JSON.stringify(popups.dialogs)}`);
      continue;
    }
    const unknown = await page.evaluate(() =>
      window.app.graph._nodes.filter((n) => n.has_errors || !(n.type in window.LiteGraph.registered_node_types)).map((n) => n.type),
    );
    if (unknown.length) {
      failures.push(`${name}: nodes drawn as missing: ${unknown.join(", ")}`);
      continue;
    }
    const fit = await page.evaluate(fitGraph, { clip: CLIP, margin: MARGIN });
    await page.evaluate(frames, 3);
    await page.waitForTimeout(500); // DOM widgets (text areas, the live view) follow the canvas
    await page.evaluate(frames, 2);
    const late = await page.evaluate(openPopups);
    if (late.dialogs.length || late.toasts.length) await page.waitForTimeout(500);
    if (pageErrors.length > errorsBefore) {
      failures.push(`${name}: page errors: ${pageErrors.slice(errorsBefore).join(" | ")}`);
      continue;
    }
    const png = join(temp, `${name}.png`);
    await page.screenshot({ path: png, clip: CLIP });
    const jpg = join(opts["out-dir"], `${name}.jpg`);
    const resized = spawnSync(PIL_PYTHON, ["-c", PIL_RESIZE, png, jpg, opts.width, opts.quality], { encoding: "utf8" });
    if (resized.status !== 0) {
      failures.push(`${name}: resizing failed: ${resized.stderr}`);
      continue;
    }
    const [w, h] = resized.stdout.trim().split(" ").map(Number);
    written.push({ name, jpg, width: w, height: h, scale: Number(fit.scale.toFixed(3)), nodes: fit.nodes,
      toasts: [...popups.toasts, ...late.toasts] });
  }
} catch (err) {
  failures.push(`aborted: ${err.stack || err}`);
} finally {
  await context?.close().catch(() => {});
  cleanup();
  if (server) {
    for (let i = 0; i < 50 && server.exitCode === null && server.signalCode === null; i++) await sleep(100);
    if (server.exitCode === null && server.signalCode === null) {
      try {
        process.kill(-server.pid, "SIGKILL");
      } catch {
        // gone
      }
    }
  }
  rmSync(temp, { recursive: true, force: true });
}

console.log(JSON.stringify({ written, failures }, null, 2));
if (failures.length) {
  console.error(failures.join("\n"));
  process.exit(1);
}
