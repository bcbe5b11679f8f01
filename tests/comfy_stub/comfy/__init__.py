"""Stand-in for ComfyUI's ``comfy`` package (only the submodules the node pack uses)."""
