// Headless Chromium check of the web extension (web/comfyui_tuner.js).
//
// Serves, on 127.0.0.1, a page laid out as ComfyUI serves its frontend: /scripts/app.js and
// /scripts/api.js (the stand-ins of tests/comfy_stub/frontend/scripts), the extension at
// /extensions/comfyui-tuner/comfyui_tuner.js, and /api/view for the recorded validation images.
// The page (page/replay.js) registers a Train LoRA node and a KSampler and replays one recorded
// run's websocket messages (fixture/events.json, written by record_events.py; ComfyUI's own
// messages in it are drawn as its frontend draws them), then, on a second Train LoRA node, what the
// server sends when that run is queued again with fewer steps. Then it checks: no console errors,
// page errors or failed requests; the Train LoRA node kept its size through the whole run and never
// showed a second status text (issue 14, items 16 and 17); on both nodes the loss chart is drawn
// (the line's pixels span the plot), the status line, and the latest samples (every image loaded,
// scaled into the samples row); nothing on the KSampler; the error dialog of our node is titled
// with its name, and the error's first line is its status. A third Train LoRA node, given the run's
// progress with CREPA's and scheduled sampling's fields, draws the CREPA term as a second (orange)
// line across the plot and its legend; the recorded run, without them, draws neither (issue 17). Prints a JSON summary on stdout and exits 1 with the failures on stderr.
//
//   node check_extension.mjs [--screenshot out.png] [--chromium /usr/bin/chromium]
//
// Needs `npm ci` here (playwright-core, which drives the system Chromium; it downloads nothing).

import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join, normalize, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { HEADLESS_CHROMIUM_ARGS } from "./headless.mjs";
import { chromium } from "playwright-core";

const HERE = dirname(fileURLToPath(import.meta.url));
const PACK = resolve(HERE, "..", "..");
const FIXTURE = join(HERE, "fixture");

const { values: opts } = parseArgs({
  options: {
    screenshot: { type: "string", default: join(tmpdir(), "comfyui-tuner-train-lora.png") },
    chromium: { type: "string", default: process.env.CHROMIUM || "/usr/bin/chromium" },
    timeout: { type: "string", default: "15000" },
  },
});
const timeout = Number(opts.timeout);

// ------------------------------------------------------------------ the server
const routes = {
  "/": join(HERE, "page", "index.html"),
  "/replay.js": join(HERE, "page", "replay.js"),
  "/events.json": join(FIXTURE, "events.json"),
  "/scripts/app.js": join(PACK, "tests", "comfy_stub", "frontend", "scripts", "app.js"),
  "/scripts/api.js": join(PACK, "tests", "comfy_stub", "frontend", "scripts", "api.js"),
  "/extensions/comfyui-tuner/comfyui_tuner.js": join(PACK, "web", "comfyui_tuner.js"),
};
const TYPES = { ".html": "text/html", ".js": "text/javascript", ".json": "application/json", ".png": "image/png" };

function viewFile(params) {
  // ComfyUI's /view: <type folder>/<subfolder>/<filename>; here the fixture holds the output folder
  const type = params.get("type") || "output";
  const root = join(FIXTURE, type);
  const file = normalize(join(root, params.get("subfolder") || "", params.get("filename") || ""));
  return file.startsWith(root + sep) ? file : null;
}

const server = createServer((req, res) => {
  const url = new URL(req.url, "http://127.0.0.1");
  const file = url.pathname === "/api/view" ? viewFile(url.searchParams) : routes[url.pathname];
  let body;
  try {
    if (!file || !statSync(file).isFile()) throw new Error("not found");
    body = readFileSync(file);
  } catch {
    res.writeHead(404, { "content-type": "text/plain" }).end("not found");
    return;
  }
  const ext = file.slice(file.lastIndexOf("."));
  res.writeHead(200, { "content-type": TYPES[ext] || "application/octet-stream", "cache-control": "no-store" });
  res.end(body);
});
await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
const origin = `http://127.0.0.1:${server.address().port}`;

// ------------------------------------------------------------------ the browser
const profile = mkdtempSync(join(tmpdir(), "comfyui-tuner-chromium-"));
const failures = [];
const consoleLines = [];
let context;
let summary = {};
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: opts.chromium,
    headless: true,
    timeout,
    args: HEADLESS_CHROMIUM_ARGS,
    viewport: { width: 480, height: 900 },
    deviceScaleFactor: 2,
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(timeout);
  page.on("console", (msg) => {
    consoleLines.push(`${msg.type()}: ${msg.text()}`);
    if (msg.type() === "error") failures.push(`console error: ${msg.text()}`);
  });
  page.on("pageerror", (err) => failures.push(`page error: ${err.stack || err.message}`));
  page.on("requestfailed", (req) => failures.push(`request failed: ${req.url()} (${req.failure()?.errorText})`));
  page.on("response", (resp) => {
    if (resp.status() >= 400) failures.push(`HTTP ${resp.status()} for ${resp.url()}`);
  });

  await page.goto(`${origin}/`, { waitUntil: "load" });
  await page.waitForFunction(() => window.__replayed || window.__replayFailed);
  const replayFailed = await page.evaluate(() => window.__replayFailed);
  if (replayFailed) throw new Error(`the replay failed: ${replayFailed}`);
  // every sample image loaded (or failed: then naturalWidth stays 0 and the check below says so)
  await page.waitForFunction(() => [...document.querySelectorAll(".node img")].every((img) => img.complete));

  summary = await page.evaluate(() => {
    function shown(id) {
      const live = document.querySelector(`#node-${id} .comfyui-tuner-live`);
      if (!live) return null;
      const [canvas, status, samples] = live.children;
      const row = samples.getBoundingClientRect();
      const { width, height } = canvas;
      const data = canvas.getContext("2d").getImageData(0, 0, width, height).data;
      const background = [0x1b, 0x1b, 0x1b];
      let drawn = 0;
      const lineColumns = new Set();
      const crepaColumns = new Set();
      for (let i = 0; i < data.length; i += 4) {
        const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
        if (Math.abs(r - background[0]) + Math.abs(g - background[1]) + Math.abs(b - background[2]) > 24) drawn++;
        if (b > 150 && b - r > 60) lineColumns.add((i / 4) % width); // the blue loss line, not the grey text
        if (r > 150 && r - b > 90 && g > 70) crepaColumns.add((i / 4) % width); // the orange CREPA line and legend
      }
      const ratio = window.devicePixelRatio;
      return {
        chart: {
          width,
          height,
          cssWidth: canvas.clientWidth,
          cssHeight: canvas.clientHeight,
          drawnPixels: drawn,
          drawnFraction: drawn / (width * height),
          lineColumns: lineColumns.size,
          lineFirstColumn: Math.min(...lineColumns) / ratio,
          lineLastColumn: Math.max(...lineColumns) / ratio,
          crepaColumns: crepaColumns.size,
          crepaFirstColumn: crepaColumns.size ? Math.min(...crepaColumns) / ratio : null,
          crepaLastColumn: crepaColumns.size ? Math.max(...crepaColumns) / ratio : null,
          legend: canvas.title,
        },
        status: status.textContent,
        statusLines: Math.round(status.getBoundingClientRect().height / parseFloat(getComputedStyle(status).lineHeight)),
        samplesRow: { width: row.width, height: row.height },
        samples: [...samples.querySelectorAll("img")].map((img) => {
          const box = img.getBoundingClientRect();
          return {
            title: img.title,
            src: img.getAttribute("src"),
            loaded: img.complete && img.naturalWidth > 0,
            naturalWidth: img.naturalWidth,
            inRow: box.left >= row.left - 0.5 && box.right <= row.right + 0.5 && box.top >= row.top - 0.5 && box.bottom <= row.bottom + 0.5,
            shownHeight: box.height,
          };
        }),
      };
    }
    return {
      replayed: window.__replayed,
      train: shown(7),
      queuedAgain: shown(9),
      crepa: shown(11)?.chart,
      failedStatus: document.querySelector("#node-10 .comfyui-tuner-live").children[1].textContent,
      kSamplerChildren: document.querySelector("#node-8 .body").children.length,
    };
  });
  await page.locator("#graph").screenshot({ path: opts.screenshot });
  summary.screenshot = opts.screenshot;
} catch (err) {
  failures.push(`check aborted: ${err.stack || err}`);
} finally {
  await context?.close().catch(() => {});
  server.close();
  rmSync(profile, { recursive: true, force: true });
}

// ------------------------------------------------------------------ what it must show
const messages = JSON.parse(readFileSync(join(FIXTURE, "events.json"), "utf8"));
const of = (event) => messages.filter(([name]) => name === `comfyui-tuner.${event}`).map(([, d]) => d);
const [done] = of("done").slice(-1);
const [latest] = of("validation").slice(-1);
const expect = (ok, what) => ok || failures.push(what);

function expectNode(name, view, { titles, images }) {
  if (!view) return failures.push(`${name}: no live view on the node`);
  const { chart, samples } = view;
  expect(chart.cssHeight === 150 && chart.width === 2 * chart.cssWidth, `${name}: chart canvas size: ${JSON.stringify(chart)}`);
  // drawn: axis labels and the loss lines over the background; the line runs across the plot
  expect(chart.drawnFraction > 0.005, `${name}: the chart looks empty: ${JSON.stringify(chart)}`);
  expect(
    chart.lineColumns > 0.7 * (chart.width - 2 * 52) && chart.lineFirstColumn < 50 && chart.lineLastColumn > chart.cssWidth - 20,
    `${name}: the loss line does not span the plot: ${JSON.stringify(chart)}`,
  );
  expect(view.status === `done: ${done.lora_name} (${done.steps} steps)`, `${name}: status line: ${view.status}`);
  expect(view.statusLines === 1, `${name}: the status takes ${view.statusLines} lines`);
  expect(JSON.stringify(samples.map((img) => img.title)) === JSON.stringify(titles), `${name}: samples: ${JSON.stringify(samples)}`);
  expect(JSON.stringify(samples.map((img) => img.src)) === JSON.stringify(images), `${name}: samples: ${JSON.stringify(samples)}`);
  // scaled to fit the row: the 64 px samples fill its height, and nothing spills out of it
  expect(
    samples.every((img) => img.loaded && img.naturalWidth === 64 && img.inRow && img.shownHeight === view.samplesRow.height),
    `${name}: images: ${JSON.stringify(samples)} in ${JSON.stringify(view.samplesRow)}`,
  );
}

if (summary.replayed) {
  const view = (ref) => `/api/view?${new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder, type: ref.type })}`;
  expect(summary.replayed.messages === messages.length, "not every message was replayed");
  expect(JSON.stringify(summary.replayed.extensions) === '["comfyui-tuner.live"]', "the extension did not register once");
  // the node keeps its size while it trains and after; one status text, never a second one
  const { before, max, after, otherText } = summary.replayed.trainNodeHeight;
  expect(before > 0 && max <= before + 0.5 && Math.abs(after - before) <= 0.5, `the Train LoRA node grew: ${before} -> max ${max}, after ${after} px`);
  expect(otherText.length === 0, `the Train LoRA node showed a second status text, after: ${[...new Set(otherText)].join(", ")}`);
  // the run: the latest validation's samples; done repeats them and adds nothing
  expectNode("the recorded run", summary.train, {
    titles: latest.images.map((ref) => `step ${latest.step}: ${ref.filename}`),
    images: latest.images.map(view),
  });
  // queued again with fewer steps: the history, and done's samples
  expectNode("queued again", summary.queuedAgain, {
    titles: done.images.map((ref) => `step ${done.steps}: ${ref.filename}`),
    images: done.images.map(view),
  });
  expect(summary.kSamplerChildren === 0, "the KSampler got a widget");
  // issue 17: a run without CREPA or scheduled sampling draws the loss alone; one with them adds the
  // CREPA term's line across the plot, and the legend of the latest values
  for (const [name, view] of [["the recorded run", summary.train], ["queued again", summary.queuedAgain]]) {
    expect(view && view.chart.crepaColumns === 0 && view.chart.legend === "", `${name}: drew a CREPA line or legend: ${JSON.stringify(view?.chart)}`);
  }
  const progress = of("progress");
  const score = 0.2 + 0.02 * (progress.length - 1);
  const legend = `crepa ${(-0.5 * score).toFixed(4)}  align ${score.toFixed(3)}  rollout passes ${Math.ceil((progress.length - 1) / 2)}`;
  const crepa = summary.crepa;
  expect(crepa?.legend === legend, `CREPA node's legend: ${crepa?.legend}, not ${legend}`);
  expect(
    crepa && crepa.lineColumns > 300 && crepa.crepaColumns > 0.7 * (crepa.width - 2 * 52) && crepa.crepaFirstColumn < 50 && crepa.crepaLastColumn > crepa.cssWidth - 20,
    `the CREPA line does not span the plot: ${JSON.stringify(crepa)}`,
  );
  // an error before the trainer started: the dialog titled with the node's name, the first line in its area
  expect(summary.failedStatus === "error: Train LoRA needs a model", `failed node's status: ${summary.failedStatus}`);
  expect(
    JSON.stringify(summary.replayed.dialogTitles) === '["Train LoRA (no model connected)","KSampler"]',
    `error dialog titles: ${JSON.stringify(summary.replayed.dialogTitles)}`,
  );
}

console.log(JSON.stringify({ ok: failures.length === 0, ...summary, console: consoleLines, failures }, null, 1));
if (failures.length) {
  console.error(failures.join("\n"));
  process.exit(1);
}
