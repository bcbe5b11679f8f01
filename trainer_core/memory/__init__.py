"""Memory features: what makes a model fit a GPU (SimpleTuner's memory options, ``spec.memory``).

- ``check``: every memory option checked before any model loads (refused combinations, missing packages);
- ``quantize``: frozen base weights in int8/fp8/int4 (optimum-quanto) or int8/fp8 (torchao), before the LoRA;
- ``offload``: group offloading of frozen weights for training (the LoRA stays on the device);
- ``startup``: text encoders, then VAE, then transformer, each released and checked before the next;
- ``transformer``: the transformer's load -> quantise -> LoRA -> place order, and the ``memory`` event;
- ``report``: bytes that are really resident (quantised weights at their real size), RSS, CUDA figures.

Submodules are imported where used: ``offload`` pulls in diffusers.
"""
