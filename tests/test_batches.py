"""What a training batch holds: the engine's batches drop captions at the configured rate."""

from __future__ import annotations

import pytest
import torch
from helpers.datasets import lumina_spec, write_dataset

from trainer_core.events import ListSink
from trainer_core.spec import TrainSpec
from trainer_core.train.engine import Trainer

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

DRAWS = 1000  # batches of 2: 2000 captions, so the dropped share is within ±0.02 of p at 3 sigma


@pytest.mark.parametrize("probability", [0.1, 0.9])
def test_caption_dropout_replaces_that_share_of_the_captions_with_the_empty_prompt(tiny_lumina2, tmp_path, probability):
    data = write_dataset(tmp_path / "data", {"a": "a red circle", "b": "a blue circle"})
    spec = lumina_spec(tiny_lumina2, data, tmp_path / "out", training={"caption_dropout_probability": probability})
    trainer = Trainer(TrainSpec.model_validate(spec), ListSink(), device="cpu")
    trainer.prepare()
    trainer.fill_caches()
    trainer.build_model()  # the batches are the engine's own, built as a run builds them
    generator = torch.Generator().manual_seed(1234)
    batches = [trainer.batches.build([0, 1], generator) for _ in range(DRAWS)]
    captions = [c for b in batches for c in b.captions]

    dropped = captions.count("") / len(captions)
    assert dropped == pytest.approx(probability, abs=0.02)
    assert set(captions) == {"", "a red circle", "a blue circle"}
    # a dropped caption is conditioned on the empty prompt's embedding, not on its own caption's
    empty = trainer.batches.text("")["prompt_embeds"]
    batch = next(b for b in batches if b.captions[0] == "")
    torch.testing.assert_close(batch.text["prompt_embeds"][0, : empty.shape[0]], empty)
