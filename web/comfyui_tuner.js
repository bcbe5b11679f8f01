// comfyui-tuner web extension: one bounded live area on the Train LoRA and Fine-tune Model nodes (a
// loss chart, one status line, the latest validation samples), and readable error titles for the
// pack's nodes.
//
// The Python side (nodes/train_monitor.py, nodes/train_run.py) sends websocket messages named
// "comfyui-tuner.<event>", each with the id of the node that is training:
//   started    {node, total, history: [[step, loss]...], output_dir, mode, evaluations?}
//   progress   {node, step, total, loss, lr, it_s, eta_s}, and when the run has them CREPA's
//              crepa_* values and scheduled sampling's rollout_passes_total
//   validation {node, step, images: [{filename, subfolder, type}]}
//   evaluation {node, step, clip_score, scores: {prompt name: score}}   (evaluation_type clip)
//   status     {node, text}        warning {node, message}
//   done       {node, steps, lora_name, lora_path, reused, history, images}
//              (a full fine-tune: model_name, model_path instead of lora_name, lora_path)
//   cancelled  {node, step, checkpoint, text}      error {node, message}
// and the node's ui output holds done's summary under "comfyui_tuner" (ComfyUI re-sends it when it
// answers a re-queue from its cache). Images are files ComfyUI's /view route serves.
//
// The area has a fixed height (the DOM widget's min and max height, and the element's own), so the
// node never grows while it trains: samples are scaled to fit one row, and the status is one line.
// The node sends no progress-bar preview and no progress_text, which the frontend would draw outside
// this area (issue 14, items 16 and 17).
//
// With CREPA the chart adds the CREPA term as an orange line on its own scale (it is negative,
// -alignment x weight), and a legend under the plot gives the latest term, alignment score and
// rollout passes (also the canvas's tooltip). A run without them draws only the loss (issue 17).
// With CLIP evaluation the CLIP score (0-100) is a green line with dots on its own scale, its latest
// value at the top right (issue 18).

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NS = "comfyui-tuner";
const NODE_TYPES = new Set(["TunerTrainLoRA", "TunerFinetuneModel"]); // the nodes that train
const UI_KEY = "comfyui_tuner"; // the training nodes' ui output (nodes/train_run.py UI_KEY)
const CHART_HEIGHT = 150;
const STATUS_HEIGHT = 16;
const SAMPLES_HEIGHT = 120;
const GAP = 4;
const AREA_HEIGHT = CHART_HEIGHT + STATUS_HEIGHT + SAMPLES_HEIGHT + 2 * GAP;
const MAX_SAMPLES = 8; // one validation's samples (prompts x resolutions), each scaled into the row
const CREPA_COLOUR = "#e8902a";
const CLIP_COLOUR = "#5cc06b";

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

// The regularisers' latest values from a progress message ("" when the run has none of them).
function regularisers(d) {
  const parts = [];
  if (d.crepa_loss !== undefined) parts.push(`crepa ${Number(d.crepa_loss).toFixed(4)}`);
  if (d.crepa_alignment_score !== undefined) parts.push(`align ${Number(d.crepa_alignment_score).toFixed(3)}`);
  if (d.rollout_passes_total !== undefined) parts.push(`rollout passes ${d.rollout_passes_total}`);
  return parts.join("  ");
}

class TrainView {
  constructor(node) {
    this.node = node;
    this.points = [];
    this.crepa = []; // [step, CREPA term]: CREPA runs only, from their progress messages
    this.clip = []; // [step, CLIP score]: evaluation runs only, from their evaluation messages
    this.legend = ""; // the regularisers' latest values
    this.total = 0;
    this.samplesKey = ""; // the shown samples' URLs: done repeats the last validation's
    this.root = document.createElement("div");
    this.root.className = "comfyui-tuner-live";
    Object.assign(this.root.style, {
      display: "flex",
      flexDirection: "column",
      gap: `${GAP}px`,
      width: "100%",
      height: `${AREA_HEIGHT}px`,
      overflow: "hidden",
      boxSizing: "border-box",
    });
    this.canvas = document.createElement("canvas");
    Object.assign(this.canvas.style, { width: "100%", height: `${CHART_HEIGHT}px`, flex: "none", borderRadius: "4px" });
    this.status = document.createElement("div");
    Object.assign(this.status.style, {
      height: `${STATUS_HEIGHT}px`,
      lineHeight: `${STATUS_HEIGHT}px`,
      flex: "none",
      fontSize: "11px",
      opacity: "0.8",
      whiteSpace: "nowrap",
      overflow: "hidden",
      textOverflow: "ellipsis",
    });
    this.samples = document.createElement("div");
    Object.assign(this.samples.style, {
      height: `${SAMPLES_HEIGHT}px`,
      flex: "none",
      display: "flex",
      gap: "3px",
      justifyContent: "center",
      overflow: "hidden",
    });
    this.root.append(this.canvas, this.status, this.samples);
    if (typeof node.addDOMWidget === "function") {
      node.addDOMWidget("tuner_live", "comfyui-tuner-live", this.root, {
        serialize: false,
        hideOnZoom: false,
        getMinHeight: () => AREA_HEIGHT,
        getMaxHeight: () => AREA_HEIGHT,
      });
    }
    this.draw();
  }

  reset(total, history, evaluations) {
    this.total = total || 0;
    this.points = (history || []).map(([s, l]) => [Number(s), Number(l)]);
    this.crepa = []; // the history holds the loss alone
    this.clip = (evaluations || []).map((e) => [Number(e.step), Number(e.clip_score)]);
    this.legend = "";
    this.draw();
  }

  addPoint(step, loss, total, d = {}) {
    if (total) this.total = total;
    const last = this.points[this.points.length - 1];
    if (last && step <= last[0]) {
      this.points = this.points.filter(([s]) => s < step);
      this.crepa = this.crepa.filter(([s]) => s < step);
      this.clip = this.clip.filter(([s]) => s < step);
    }
    this.points.push([step, loss]);
    if (d.crepa_loss !== undefined) this.crepa.push([step, Number(d.crepa_loss)]);
    this.legend = regularisers(d);
    this.draw();
  }

  addEvaluation(step, score) {
    this.clip = this.clip.filter(([s]) => s < step);
    this.clip.push([step, score]);
    this.draw();
  }

  // The latest samples replace the earlier ones: one row, each image scaled to fit it.
  showSamples(step, images) {
    const refs = (images || []).slice(0, MAX_SAMPLES);
    const urls = refs.map(viewUrl);
    const key = urls.join("\n");
    if (!refs.length || key === this.samplesKey) return;
    this.samplesKey = key;
    this.samples.replaceChildren(
      ...refs.map((ref, i) => {
        const img = document.createElement("img");
        img.src = urls[i];
        img.title = `step ${step}: ${ref.filename}`;
        Object.assign(img.style, {
          flex: "1 1 0",
          minWidth: "0",
          maxWidth: `${SAMPLES_HEIGHT * 2}px`,
          height: "100%",
          objectFit: "contain",
          cursor: "pointer",
        });
        img.onclick = () => window.open(img.src, "_blank");
        return img;
      }),
    );
    this.node.setDirtyCanvas?.(true, true);
  }

  setStatus(text) {
    this.status.textContent = text || "";
    this.status.title = text || "";
  }

  finish(d) {
    if (d.reused || !this.points.length) this.reset(d.steps, d.history);
    // the latest samples: new when the run had nothing left to train (fewer steps than done before)
    this.showSamples(d.steps, d.images);
    this.setStatus(`${d.reused ? "already trained" : "done"}: ${d.model_name ?? d.lora_name} (${d.steps} steps)`);
  }

  draw() {
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(200, this.canvas.clientWidth || 300);
    this.canvas.width = width * ratio;
    this.canvas.height = CHART_HEIGHT * ratio;
    this.canvas.title = this.legend; // the regularisers' latest values, as a tooltip too
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
    const scale = (lo, hi) => (l) => CHART_HEIGHT - pad.bottom - ((l - lo) / (hi - lo)) * (CHART_HEIGHT - pad.top - pad.bottom);
    const y = scale(lo, hi);
    const line = (values, colour, lineWidth, steps = finite, at = y) => {
      ctx.strokeStyle = colour;
      ctx.lineWidth = lineWidth;
      ctx.beginPath();
      values.forEach((l, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x(steps[i][0]), at(l)));
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
    const crepa = this.crepa.filter(([s, v]) => s >= s0 && Number.isFinite(v));
    if (crepa.length) {
      // its own scale: the term is negative and far from the loss
      const values = crepa.map(([, v]) => v);
      const flat = Math.max(...values) - Math.min(...values) < 1e-12 ? 0.5 : 0;
      line(values, CREPA_COLOUR, 1.5, crepa, scale(Math.min(...values) - flat, Math.max(...values) + flat));
    }
    const clip = this.clip.filter(([, v]) => Number.isFinite(v)).map(([s, v]) => [Math.max(s, s0), v]);
    if (clip.length) {
      // its own scale (a score out of 100); dots, since there is one per evaluation (step 0 at the left edge)
      const values = clip.map(([, v]) => v);
      const flat = Math.max(...values) - Math.min(...values) < 1e-12 ? 0.5 : 0;
      const at = scale(Math.min(...values) - flat, Math.max(...values) + flat);
      line(values, CLIP_COLOUR, 1.5, clip, at);
      ctx.fillStyle = CLIP_COLOUR;
      clip.forEach(([s, v]) => ctx.fillRect(x(s) - 2, at(v) - 2, 4, 4));
      const latest = `clip ${values[values.length - 1].toFixed(2)}`;
      ctx.fillText(latest, width - pad.right - ctx.measureText(latest).width, 10);
    }
    if (this.legend) {
      ctx.fillStyle = crepa.length ? CREPA_COLOUR : "#ccc";
      ctx.fillText(this.legend, pad.left, CHART_HEIGHT - 3);
    }
  }
}

const views = new WeakMap();

function viewFor(nodeId) {
  const graph = app.graph;
  if (!graph || nodeId === undefined || nodeId === null) return null;
  const node = graph.getNodeById(Number(nodeId)) ?? graph.getNodeById(nodeId);
  if (!node || !NODE_TYPES.has(node.comfyClass)) return null;
  if (!views.has(node)) views.set(node, new TrainView(node));
  return views.get(node);
}

function on(event, handler) {
  api.addEventListener(`${NS}.${event}`, ({ detail }) => {
    const view = viewFor(detail?.node);
    if (view) handler(view, detail);
  });
}

// Error dialogs title an execution error with its node_type, the class name (TunerTrainLoRA). For our
// nodes, put the node's title (its display name unless renamed) there instead. Registered when this
// module loads, before the frontend adds its own execution_error handler, so the dialog reads it.
// The exception type is readable already: the nodes raise errors named after their display name.
function displayName(nodeId, nodeType) {
  const id = String(nodeId ?? "");
  const node = app.graph?.getNodeById?.(Number(id)) ?? app.graph?.getNodeById?.(id);
  if (node?.comfyClass === nodeType) return node.title || node.constructor?.title;
  return globalThis.LiteGraph?.registered_node_types?.[nodeType]?.title;
}

api.addEventListener("execution_error", ({ detail }) => {
  if (!detail || !String(detail.node_type || "").startsWith("Tuner")) return;
  // an error before the trainer started (bad settings) sends no message of ours: say it in the area
  viewFor(detail.node_id)?.setStatus(`error: ${String(detail.exception_message || "").split("\n")[0]}`);
  const name = displayName(detail.node_id, detail.node_type);
  if (name) detail.node_type = name;
});

// Graphs saved before Validation Settings' video widgets moved to Validation Video Options hold 11
// widget values, the last two video_frames and video_frame_rate. The frontend assigns values by
// position, so those two would land in the CLIP evaluation widgets that came after them (issue 18):
// give those their defaults back.
const OLD_VALIDATION_VALUES = 11;
const CLIP_DEFAULTS = { evaluation: "none", eval_every: 0, clip_model: "openai/clip-vit-large-patch14" };

function repairOldValidationSettings(node, info) {
  if (info?.widgets_values?.length !== OLD_VALIDATION_VALUES) return;
  for (const widget of node.widgets ?? []) {
    if (widget.name in CLIP_DEFAULTS) widget.value = CLIP_DEFAULTS[widget.name];
  }
}

app.registerExtension({
  name: "comfyui-tuner.live",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== "TunerValidationSettings") return;
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const result = onConfigure?.apply(this, arguments);
      repairOldValidationSettings(this, info);
      return result;
    };
  },
  async setup() {
    on("started", (view, d) => {
      view.reset(d.total, d.history, d.evaluations);
      view.setStatus(d.mode === "restart" ? "restarting from scratch" : "starting");
    });
    on("progress", (view, d) => view.addPoint(Number(d.step), Number(d.loss), Number(d.total), d));
    on("validation", (view, d) => view.showSamples(d.step, d.images));
    on("evaluation", (view, d) => view.addEvaluation(Number(d.step), Number(d.clip_score)));
    on("status", (view, d) => view.setStatus(d.text));
    on("warning", (view, d) => view.setStatus(`warning: ${d.message}`));
    on("cancelled", (view, d) => view.setStatus(d.text));
    on("error", (view, d) => view.setStatus(String(d.message || "").split("\n")[0]));
    on("done", (view, d) => view.finish(d));
  },
  async nodeCreated(node) {
    if (!NODE_TYPES.has(node.comfyClass) || views.has(node)) return;
    views.set(node, new TrainView(node));
    const onExecuted = node.onExecuted;
    node.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const [summary] = output?.[UI_KEY] ?? [];
      if (summary) views.get(this)?.finish(summary);
    };
  },
});
