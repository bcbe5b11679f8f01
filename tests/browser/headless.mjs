// Chromium flags for headless runs on a machine with no network: without the background-networking
// flags Chromium keeps trying (and failing) to reach Google's services. Shared by the extension check
// and scripts/make_workflow_thumbnails.mjs.
export const HEADLESS_CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
