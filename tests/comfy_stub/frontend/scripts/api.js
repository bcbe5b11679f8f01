// Stand-in for ComfyUI frontend's scripts/api.js: websocket messages arrive as CustomEvent-like
// objects with a `detail`, as in ComfyUI's ComfyApi (an EventTarget).
export const api = {
  listeners: new Map(),
  addEventListener(type, handler) {
    if (!this.listeners.has(type)) this.listeners.set(type, []);
    this.listeners.get(type).push(handler);
  },
  dispatch(type, detail) {
    for (const handler of this.listeners.get(type) ?? []) handler({ type, detail });
  },
  apiURL(route) {
    return `/api${route}`;
  },
};
