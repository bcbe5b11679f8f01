// Stand-in for ComfyUI frontend's scripts/app.js: registerExtension and a graph of nodes by id.
export const app = {
  extensions: [],
  graph: {
    nodes: new Map(),
    getNodeById(id) {
      return this.nodes.get(id) ?? null;
    },
  },
  registerExtension(extension) {
    this.extensions.push(extension);
  },
};
