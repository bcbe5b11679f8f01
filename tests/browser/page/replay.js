// Runs in the page: loads the extension the way ComfyUI's frontend does (a module under
// /extensions/<pack>/ that imports ../../scripts/app.js and ../../scripts/api.js), registers a fake
// Train LoRA node and a KSampler, then replays one recorded run's websocket messages. A second Train
// LoRA node then gets what the server sends when that run is queued again with fewer steps than it
// has (seen in a real ComfyUI): `started` with the whole loss history, then `done` at once, with
// the run's latest samples and no `validation` message in between. A third one gets the run's
// progress messages with the fields a CREPA run with scheduled sampling adds (issue 17; made up
// here: the recorded run, on the tiny Lumina 2, has neither).
//
// ComfyUI's own messages in the recording are drawn as its frontend draws them (1.35.9 and 1.49.6,
// read from their bundles): `progress_text` as a text widget of its own ("$$node-text-preview", at
// least 58 px high, kept with its last text after the run), a progress-bar preview (`b_preview`) or
// an `executed` output with "images" as an image preview widget ("$$canvas-image-preview", at least
// 220 px); `executed` also calls the node's onExecuted. A node grows to hold its widgets: here the
// node's box grows with its body. After each message the page notes the Train LoRA node's height and
// whether its body shows any text besides the extension's one status line.
import { app } from "/scripts/app.js";
import { api } from "/scripts/api.js";

const graph = document.getElementById("graph");
const FRONTEND_WIDGETS = { progress_text: ["text-preview", 58], b_preview: ["image-preview", 220] };

function frontendWidget(nodeId, kind, minHeight) {
  const body = document.querySelector(`#node-${nodeId} .body`);
  let widget = body.querySelector(`.frontend-${kind}`);
  if (!widget) {
    widget = document.createElement("div");
    widget.className = `frontend-${kind}`;
    widget.style.minHeight = `${minHeight}px`;
    body.append(widget);
  }
  return widget;
}

function drawAsTheFrontend(name, detail) {
  const node = app.graph.getNodeById(Number(detail.node));
  if (name === "executed") {
    node?.onExecuted?.(detail.output);
    if (detail.output?.images?.length) frontendWidget(detail.node, "image-preview", 220);
    return;
  }
  if (!(name in FRONTEND_WIDGETS)) return;
  const widget = frontendWidget(detail.node, ...FRONTEND_WIDGETS[name]);
  if (name === "progress_text") widget.textContent = detail.text;
  else widget.style.height = `${Math.min(detail.height, detail.max_size)}px`;
}

function measure(id) {
  const box = document.getElementById(`node-${id}`);
  const status = box.querySelector(".comfyui-tuner-live")?.children[1];
  const text = box.querySelector(".body").innerText.trim();
  return { height: box.getBoundingClientRect().height, otherText: status ? text !== status.innerText.trim() : !!text };
}

function makeNode(id, comfyClass, title) {
  const box = document.createElement("div");
  box.className = "node";
  box.id = `node-${id}`;
  box.innerHTML = `<div class="title">${title}</div><div class="body"></div>`;
  graph.append(box);
  const node = {
    id,
    comfyClass,
    title,
    widgets: [],
    // LGraphNode.addDOMWidget: the element is placed over the node's body
    addDOMWidget(name, type, element, options) {
      box.querySelector(".body").append(element);
      this.widgets.push({ name, type, serialize: options?.serialize });
      return { name, element };
    },
    setDirtyCanvas() {},
  };
  app.graph.nodes.set(id, node);
  return node;
}

async function main() {
  await import("/extensions/comfyui-tuner/comfyui_tuner.js");
  const train = makeNode(7, "TunerTrainLoRA", "Train LoRA");
  const other = makeNode(8, "KSampler", "KSampler");
  const again = makeNode(9, "TunerTrainLoRA", "Train LoRA (queued again with fewer steps)");
  const failed = makeNode(10, "TunerTrainLoRA", "Train LoRA (no model connected)");
  const crepa = makeNode(11, "TunerTrainLoRA", "Train LoRA (CREPA, scheduled sampling)");
  // the frontend adds its own execution_error handler (the error dialog, titled with node_type)
  // after it has loaded the extensions
  const dialogTitles = [];
  api.addEventListener("execution_error", ({ detail }) => dialogTitles.push(detail.node_type));
  for (const ext of app.extensions) await ext.setup?.();
  for (const ext of app.extensions) {
    await ext.nodeCreated?.(train);
    await ext.nodeCreated?.(other);
    await ext.nodeCreated?.(again);
    await ext.nodeCreated?.(failed);
    await ext.nodeCreated?.(crepa);
  }
  const messages = await (await fetch("/events.json")).json();
  await new Promise((resolve) => setTimeout(resolve, 0));
  const sizes = { before: measure(7).height, max: 0, after: 0, otherText: [] };
  for (const [name, detail] of messages) {
    api.dispatch(name, detail);
    drawAsTheFrontend(name, detail);
    // a browser gets them one websocket frame at a time: let it lay out and paint in between
    await new Promise((resolve) => setTimeout(resolve, 0));
    const now = measure(7);
    sizes.max = Math.max(sizes.max, now.height);
    if (now.otherText) sizes.otherText.push(name);
  }
  sizes.after = measure(7).height;
  const ours = messages.filter(([name]) => name.startsWith("comfyui-tuner."));
  const [, done] = ours[ours.length - 1];
  const [, started] = ours[0];
  api.dispatch("comfyui-tuner.started", { ...started, node: "9", total: done.steps - 4, history: done.history });
  api.dispatch("comfyui-tuner.done", { ...done, node: "9" });
  api.dispatch("comfyui-tuner.started", { ...started, node: "11" });
  ours
    .filter(([name]) => name === "comfyui-tuner.progress")
    .forEach(([name, detail], i) => {
      const score = 0.2 + 0.02 * i; // the alignment grows; the term is -score x weight
      api.dispatch(name, {
        ...detail,
        node: "11",
        crepa_loss: -0.5 * score,
        crepa_alignment_score: score,
        crepa_similarity_self: score,
        crepa_weight: 0.5,
        rollout_passes: i % 2,
        rollout_passes_total: Math.ceil(i / 2),
      });
    });
  const message = "Train LoRA needs a model\nHow to fix: connect a model loader";
  api.dispatch("execution_error", {
    node_id: "10",
    node_type: "TunerTrainLoRA",
    exception_type: "Train LoRA",
    exception_message: message,
  });
  api.dispatch("execution_error", { node_id: "8", node_type: "KSampler", exception_type: "RuntimeError" });
  window.__replayed = {
    dialogTitles,
    messages: messages.length,
    trainNodeHeight: sizes,
    extensions: app.extensions.map((e) => e.name),
    widgets: { train: train.widgets, other: other.widgets, again: again.widgets },
  };
}

main().catch((err) => {
  window.__replayFailed = String(err?.stack || err);
  throw err;
});
