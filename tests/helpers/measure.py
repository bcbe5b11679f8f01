"""Before/after loss of a training run, measured the same way by every engine test.

The loss is averaged over fixed noise levels and fixed noise (a seeded generator), so a fall
between two calls is the training's doing and not the draw's.
"""

from __future__ import annotations

import torch

from trainer_core.events import ListSink
from trainer_core.spec import TrainSpec
from trainer_core.train.engine import Trainer


def eval_loss(trainer: Trainer, draws: int = 6, first_sample_only: bool = False) -> float:
    """Mean flow-matching loss of the transformer as it is, in eval mode, on the cached samples."""
    gen = torch.Generator().manual_seed(1234)
    samples = trainer.index.samples[:1] if first_sample_only else trainer.index.samples
    was_training = trainer.transformer.training
    trainer.transformer.eval()
    losses = []
    with torch.no_grad():
        for sample in samples:
            text = trainer.family.collate_text([trainer.batches.text(sample.captions[0])])
            x0 = trainer.latent_cache.load(sample)["mean"][None]
            for i in range(draws):
                sigma = torch.tensor([(i + 0.5) / draws])
                noise = torch.randn(x0.shape, generator=gen)
                pred = trainer.family.predict(trainer.transformer, (1 - sigma) * x0 + sigma * noise, sigma, text)
                losses.append(torch.mean((pred - trainer.family.target(x0, noise)) ** 2).item())
    trainer.transformer.train(was_training)
    return sum(losses) / len(losses)


def prepared_trainer(spec: TrainSpec | dict, sink: ListSink | None = None) -> Trainer:
    """A trainer with its caches filled and its model built, ready to ``train()``."""
    trainer = Trainer(spec if isinstance(spec, TrainSpec) else TrainSpec.model_validate(spec), sink or ListSink())
    trainer.prepare()
    trainer.fill_caches()
    trainer.build_model()
    return trainer


def train_and_measure(
    spec: TrainSpec | dict, sink: ListSink | None = None, draws: int = 6, first_sample_only: bool = False
) -> tuple[Trainer, object, float, float]:
    """Train ``spec``; return the trainer, its result and the loss before and after."""
    trainer = prepared_trainer(spec, sink)
    before = eval_loss(trainer, draws, first_sample_only)
    trainer.transformer.train()
    result = trainer.train()
    return trainer, result, before, eval_loss(trainer, draws, first_sample_only)
