"""comfyui-tuner's trainer core: LoRA training for Kandinsky 5 and Lumina 2.

Usable without ComfyUI: ``python -m trainer_core --help``. Importing this package is cheap;
torch, diffusers and transformers are imported by the modules that need them.
"""

__version__ = "0.1.0"
