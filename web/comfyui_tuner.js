// comfyui-tuner web extension: a live loss chart and a growing gallery of validation samples on
// the Train LoRA node.
//
// The Python side (nodes/train_monitor.py, nodes/train_run.py) sends websocket messages named
// "comfyui-tuner.<event>", each with the id of the node that is training:
//   started    {node, total, history: [[step, loss]...], output_dir, mode}
//   progress   {node, step, total, loss, lr, it_s, eta_s}
//   validation {node, step, images: [{filename, subfolder, type}]}
//   status     {node, text}        warning {node, message}
//   done       {node, steps, lora_name, lora_path, reused, history, images}
//   cancelled  {node, step, checkpoint, text}      error {node, message}
// Images are files ComfyUI's /view route serves. The progress bar and its preview image are
// ComfyUI's own and need nothing from here.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NS = "comfyui-tuner";
const NODE_TYPE = "TunerTrainLoRA";
const MAX_IMAGES = 48;
const CHART_HEIGHT = 150;

function viewUrl(ref) {
  const query = new URLSearchParams({
    filename: ref.filename,
    subfolder: ref.subfolder ?? "",
    type: ref.type ?? "output",
  });
  return api.apiURL(`/view?${query.toString()}`);
}

function smooth(values, window) {
  const out = [];
  let acc = 0;
  values.forEach((v, i) => {
    acc += v;
    if (i >= window) acc -= values[i - window];
    out.push(acc / Math.min(i + 1, window));
  });
  return out;
}

class TrainView {
  constructor(node) {
    this.node = node;
    this.points = [];
    this.total = 0;
    this.shown = new Set(); // image URLs in the gallery: done repeats the last validation's
    this.root = document.createElement("div");
    this.root.className = "comfyui-tuner-live";
    Object.assign(this.root.style, { display: "flex", flexDirection: "column", gap: "4px", width: "100%" });
    this.canvas = document.createElement("canvas");
    Object.assign(this.canvas.style, { width: "100%", height: `${CHART_HEIGHT}px`, borderRadius: "4px" });
    this.status = document.createElement("div");
    Object.assign(this.status.style, { fontSize: "11px", opacity: "0.8", whiteSpace: "pre-wrap" });
    this.gallery = document.createElement("div");
    Object.assign(this.gallery.style, { display: "flex", flexWrap: "wrap", gap: "3px" });
    this.root.append(this.canvas, this.status, this.gallery);
    if (typeof node.addDOMWidget === "function") {
      node.addDOMWidget("tuner_live", "comfyui-tuner-live", this.root, {
        serialize: false,
        hideOnZoom: false,
        getMinHeight: () => CHART_HEIGHT + 40,
      });
    }
    this.draw();
  }

  reset(total, history) {
    this.total = total || 0;
    this.points = (history || []).map(([s, l]) => [Number(s), Number(l)]);
    this.draw();
  }

  addPoint(step, loss, total) {
    if (total) this.total = total;
    const last = this.points[this.points.length - 1];
    if (last && step <= last[0]) this.points = this.points.filter(([s]) => s < step);
    this.points.push([step, loss]);
    this.draw();
  }

  addImages(step, images) {
    for (const ref of images || []) {
      const src = viewUrl(ref);
      if (this.shown.has(src)) continue;
      this.shown.add(src);
      const img = document.createElement("img");
      img.src = src;
      img.title = `step ${step}: ${ref.filename}`;
      Object.assign(img.style, { width: "64px", height: "64px", objectFit: "cover", cursor: "pointer" });
      img.onclick = () => window.open(img.src, "_blank");
      this.gallery.prepend(img);
    }
    while (this.gallery.children.length > MAX_IMAGES) this.gallery.lastChild.remove();
    this.node.setDirtyCanvas?.(true, true);
  }

  setStatus(text) {
    this.status.textContent = text || "";
  }

  draw() {
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(200, this.canvas.clientWidth || 300);
    this.canvas.width = width * ratio;
    this.canvas.height = CHART_HEIGHT * ratio;
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.fillStyle = "#1b1b1b";
    ctx.fillRect(0, 0, width, CHART_HEIGHT);
    ctx.font = "10px sans-serif";
    ctx.fillStyle = "#aaa";
    const finite = this.points.filter(([, l]) => Number.isFinite(l));
    if (!finite.length) {
      ctx.fillText("training loss appears here", 10, CHART_HEIGHT / 2);
      return;
    }
    const pad = { left: 44, right: 8, top: 14, bottom: 16 };
    const losses = finite.map(([, l]) => l);
    let lo = Math.min(...losses);
    let hi = Math.max(...losses);
    if (hi - lo < 1e-12) {
      lo -= 0.5;
      hi += 0.5;
    }
    const s0 = finite[0][0];
    const s1 = Math.max(this.total || 0, finite[finite.length - 1][0], s0 + 1);
    const x = (s) => pad.left + ((s - s0) / (s1 - s0)) * (width - pad.left - pad.right);
    const y = (l) => CHART_HEIGHT - pad.bottom - ((l - lo) / (hi - lo)) * (CHART_HEIGHT - pad.top - pad.bottom);
    const line = (values, colour, lineWidth) => {
      ctx.strokeStyle = colour;
      ctx.lineWidth = lineWidth;
      ctx.beginPath();
      values.forEach((l, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x(finite[i][0]), y(l)));
      ctx.stroke();
    };
    line(losses, "rgba(120,160,230,0.45)", 1);
    line(smooth(losses, Math.max(1, Math.floor(losses.length / 20))), "#4a90e2", 2);
    ctx.fillStyle = "#ccc";
    ctx.fillText(hi.toPrecision(4), 2, pad.top + 4);
    ctx.fillText(lo.toPrecision(4), 2, CHART_HEIGHT - pad.bottom);
    const [lastStep, lastLoss] = finite[finite.length - 1];
    const total = Math.max(this.total, lastStep); // a run queued again with fewer steps than it has
    ctx.fillText(`step ${lastStep}${this.total ? `/${total}` : ""}  loss ${lastLoss.toFixed(4)}`, pad.left, 10);
  }
}

const views = new WeakMap();

function viewFor(nodeId) {
  const graph = app.graph;
  if (!graph || nodeId === undefined || nodeId === null) return null;
  const node = graph.getNodeById(Number(nodeId)) ?? graph.getNodeById(nodeId);
  if (!node || node.comfyClass !== NODE_TYPE) return null;
  if (!views.has(node)) views.set(node, new TrainView(node));
  return views.get(node);
}

function on(event, handler) {
  api.addEventListener(`${NS}.${event}`, ({ detail }) => {
    const view = viewFor(detail?.node);
    if (view) handler(view, detail);
  });
}

app.registerExtension({
  name: "comfyui-tuner.live",
  async setup() {
    on("started", (view, d) => {
      view.reset(d.total, d.history);
      view.setStatus(d.mode === "restart" ? "restarting from scratch" : "starting");
    });
    on("progress", (view, d) => view.addPoint(Number(d.step), Number(d.loss), Number(d.total)));
    on("validation", (view, d) => view.addImages(d.step, d.images));
    on("status", (view, d) => view.setStatus(d.text));
    on("warning", (view, d) => view.setStatus(`warning: ${d.message}`));
    on("cancelled", (view, d) => view.setStatus(d.text));
    on("error", (view, d) => view.setStatus(String(d.message || "").split("\n")[0]));
    on("done", (view, d) => {
      if (d.reused || !view.points.length) view.reset(d.steps, d.history);
      // the latest samples: new when the run had nothing left to train (fewer steps than done before)
      view.addImages(d.steps, d.images);
      view.setStatus(`${d.reused ? "already trained" : "done"}: ${d.lora_name} (${d.steps} steps)`);
    });
  },
  async nodeCreated(node) {
    if (node.comfyClass === NODE_TYPE && !views.has(node)) views.set(node, new TrainView(node));
  },
});
