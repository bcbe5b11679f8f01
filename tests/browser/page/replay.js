// Runs in the page: loads the extension the way ComfyUI's frontend does (a module under
// /extensions/<pack>/ that imports ../../scripts/app.js and ../../scripts/api.js), registers a fake
// Train LoRA node and a KSampler, then replays one recorded run's websocket messages. A second Train
// LoRA node then gets what the server sends when that run is queued again with fewer steps than it
// has (seen in a real ComfyUI): `started` with the whole loss history, then `done` at once, with
// the run's latest samples and no `validation` message in between.
import { app } from "/scripts/app.js";
import { api } from "/scripts/api.js";

const graph = document.getElementById("graph");

function makeNode(id, comfyClass, title) {
  const box = document.createElement("div");
  box.className = "node";
  box.id = `node-${id}`;
  box.innerHTML = `<div class="title">${title}</div><div class="body"></div>`;
  graph.append(box);
  const node = {
    id,
    comfyClass,
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
  for (const ext of app.extensions) await ext.setup?.();
  for (const ext of app.extensions) {
    await ext.nodeCreated?.(train);
    await ext.nodeCreated?.(other);
    await ext.nodeCreated?.(again);
  }
  const messages = await (await fetch("/events.json")).json();
  for (const [name, detail] of messages) {
    api.dispatch(name, detail);
    // a browser gets them one websocket frame at a time: let it lay out and paint in between
    await new Promise((resolve) => setTimeout(resolve, 0));
  }
  const [, done] = messages[messages.length - 1];
  const [, started] = messages[0];
  api.dispatch("comfyui-tuner.started", { ...started, node: "9", total: done.steps - 4, history: done.history });
  api.dispatch("comfyui-tuner.done", { ...done, node: "9" });
  window.__replayed = {
    messages: messages.length,
    extensions: app.extensions.map((e) => e.name),
    widgets: { train: train.widgets, other: other.widgets, again: again.widgets },
  };
}

main().catch((err) => {
  window.__replayFailed = String(err?.stack || err);
  throw err;
});
