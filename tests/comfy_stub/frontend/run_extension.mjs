// Loads the pack's web extension against the stand-ins in ./scripts and a tiny DOM, replays the
// websocket messages of one training run, and prints what the Train LoRA node ended up showing.
// Usage: node run_extension.mjs <folder laid out as the server serves it> (see test_nodes_web.py).

class FakeContext {
  constructor() {
    this.calls = [];
  }
  setTransform() {}
  fillRect() {}
  fillText(text) {
    this.calls.push(["text", text]);
  }
  measureText(text) {
    return { width: 5 * String(text).length };
  }
  beginPath() {}
  moveTo() {}
  lineTo() {
    this.calls.push(["lineTo"]);
  }
  stroke() {
    this.calls.push(["stroke"]);
  }
}

class FakeElement {
  constructor(tag) {
    this.tagName = tag.toUpperCase();
    this.style = {};
    this.children = [];
    this.textContent = "";
    this.clientWidth = 300;
    this.ctx = new FakeContext();
  }
  append(...items) {
    this.children.push(...items);
  }
  prepend(item) {
    this.children.unshift(item);
  }
  replaceChildren(...items) {
    this.children = items;
  }
  get lastChild() {
    const parent = this;
    const last = this.children[this.children.length - 1];
    return last && { remove: () => parent.children.pop() };
  }
  getContext() {
    return this.ctx;
  }
}

globalThis.window = { devicePixelRatio: 2, open() {} };
globalThis.document = { createElement: (tag) => new FakeElement(tag) };

const root = process.argv[2];
const { app } = await import(`${root}/scripts/app.js`);
const { api } = await import(`${root}/scripts/api.js`);
await import(`${root}/extensions/comfyui-tuner/comfyui_tuner.js`);

const widgets = [];
const makeNode = (id, comfyClass, title) => ({
  id,
  comfyClass,
  title,
  addDOMWidget(name, type, element, options) {
    widgets.push({ node: id, name, type, element, serialize: options.serialize });
  },
  setDirtyCanvas() {},
});
const train = makeNode(7, "TunerTrainLoRA", "Train LoRA");
const other = makeNode(8, "KSampler", "KSampler");
const finetune = makeNode(9, "TunerFinetuneModel", "Fine-tune Model");
app.graph.nodes.set(7, train);
app.graph.nodes.set(8, other);
app.graph.nodes.set(9, finetune);

// the frontend's own execution_error handler (the error dialog) is added after the extensions load
const dialogTitles = [];
api.addEventListener("execution_error", ({ detail }) => dialogTitles.push(detail.node_type));
for (const ext of app.extensions) await ext.setup?.();
for (const ext of app.extensions) {
  await ext.nodeCreated?.(train);
  await ext.nodeCreated?.(other);
  await ext.nodeCreated?.(finetune);
}

const image = { filename: "validation-64x64.png", subfolder: "comfyui-tuner/run/validation/step-000002", type: "output" };
// resumed with the CLIP scores of evaluation_type clip on disk, then one more (issue 18)
const evaluations = [{ step: 0, clip_score: 20.0, scores: { validation: 20.0 } }];
api.dispatch("comfyui-tuner.started", { node: "7", total: 3, history: [[1, 1.5]], mode: "resume", evaluations });
api.dispatch("comfyui-tuner.progress", { node: "7", step: 2, total: 3, loss: 1.2 });
api.dispatch("comfyui-tuner.evaluation", { node: "7", step: 2, clip_score: 23.5, scores: { validation: 23.5 } });
api.dispatch("comfyui-tuner.progress", { node: "8", step: 2, total: 3, loss: 9.9 });
api.dispatch("comfyui-tuner.validation", { node: "7", step: 2, images: [image] });
api.dispatch("comfyui-tuner.progress", { node: "7", step: 3, total: 3, loss: 1.1 });
api.dispatch("comfyui-tuner.status", { node: "7", text: "checkpoint saved at step 3" });
const statusBeforeDone = widgets.find((w) => w.node === 7).element.children[1].textContent;
api.dispatch("comfyui-tuner.done", {
  node: "7", steps: 3, lora_name: "comfyui-tuner/t_1234_comfyui.safetensors", reused: false, history: [], images: [],
});

// a full fine-tune on the Fine-tune Model node: the same area, its file named as Load Diffusion Model lists it
api.dispatch("comfyui-tuner.started", { node: "9", total: 2, history: [], mode: "resume" });
api.dispatch("comfyui-tuner.progress", { node: "9", step: 1, total: 2, loss: 0.7 });
// with CREPA and scheduled sampling on: the CREPA term's line and the legend (issue 17)
const regularisers = { crepa_loss: -0.1, crepa_alignment_score: 0.2, crepa_weight: 0.5, rollout_passes_total: 3 };
api.dispatch("comfyui-tuner.progress", { node: "9", step: 2, total: 2, loss: 0.6, ...regularisers });
api.dispatch("comfyui-tuner.done", {
  node: "9", steps: 2, model_name: "comfyui-tuner/ft_5678_comfyui.safetensors", reused: false, history: [], images: [],
});
const [finetuneCanvas, finetuneStatus] = widgets.find((w) => w.node === 9).element.children;

const live = widgets.find((w) => w.node === 7).element;
const [canvas, status, samples] = live.children;
const statusAfterDone = status.textContent;
api.dispatch("execution_error", {
  node_id: "7", node_type: "TunerTrainLoRA", exception_type: "Train LoRA", exception_message: "bad\nHow to fix: x",
});
api.dispatch("execution_error", { node_id: "8", node_type: "KSampler", exception_type: "RuntimeError" });
console.log(
  JSON.stringify({
    extensions: app.extensions.map((e) => e.name),
    listeners: [...api.listeners.keys()].sort(),
    widgets: widgets.map((w) => ({ node: w.node, name: w.name, serialize: w.serialize })),
    statusBeforeDone,
    status: statusAfterDone,
    statusAfterError: status.textContent,
    samples: samples.children.map((img) => ({ src: img.src, title: img.title })),
    dialogTitles,
    chartText: canvas.ctx.calls.filter((c) => c[0] === "text").map((c) => c[1]),
    strokes: canvas.ctx.calls.filter((c) => c[0] === "stroke").length,
    finetuneStatus: finetuneStatus.textContent,
    finetuneChartText: finetuneCanvas.ctx.calls.filter((c) => c[0] === "text").map((c) => c[1]),
    finetuneLegend: finetuneCanvas.title,
    legend: canvas.title,
  }),
);
