"""Issue 17: the regularisers' numbers shown while and after training.

The node passes CREPA's term and alignment score (and scheduled sampling's rollout passes) on to the
live chart and its status line; the final loss plot draws the CREPA term as a second line, on its
own scale; a checkpoint keeps the term's history, so a resumed or reused run draws it whole. Runs
without CREPA send, store and draw what they did before.
"""

from __future__ import annotations

import json
from importlib import import_module

import numpy as np
import pytest
import torch

from trainer_core.train import checkpoint as ckpt
from trainer_core.train.plots import CREPA_COLOUR, draw_loss_plot

HISTORY = [[s, 1.0 / s] for s in range(1, 21)]
CREPA = [[s, -0.4 - 0.01 * s] for s in range(1, 21)]
PROGRESS = {"type": "progress", "step": 1, "total": 4, "loss": 0.5, "lr": 1e-4, "it_s": 2.0, "eta_s": 1.5}
CREPA_FIELDS = {"crepa_loss": -0.25, "crepa_alignment_score": 0.5, "crepa_similarity_self": 0.75, "crepa_weight": 0.5}


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    from comfy_stub import harness

    harness.install(tmp_path_factory.mktemp("comfy"))
    module, nodes = harness.load_pack()
    yield module, nodes
    harness.uninstall()


@pytest.fixture
def monitor(pack, tmp_path):
    from comfy_stub import harness

    harness.install(tmp_path / "comfy")
    return import_module(harness.module_name() + ".nodes.train_monitor").TrainMonitor("9", total=4)


def test_the_node_passes_crepa_on_to_the_chart_and_shows_it_in_the_status(monitor):
    import server

    monitor.handle({**PROGRESS, **CREPA_FIELDS, "rollout_passes": 2, "rollout_passes_total": 2})
    (sent,) = server.PromptServer.instance.of("comfyui-tuner.progress")
    assert {k: sent[k] for k in CREPA_FIELDS} == CREPA_FIELDS and sent["rollout_passes_total"] == 2
    status = server.PromptServer.instance.of("comfyui-tuner.status")[-1]["text"]
    assert status.endswith("· crepa -0.2500 · align 0.500 · rollout passes 2")


def test_a_run_without_regularisers_sends_what_it_sent_before(monitor):
    import server

    monitor.handle(PROGRESS)
    (sent,) = server.PromptServer.instance.of("comfyui-tuner.progress")
    assert set(sent) == {"node", "step", "total", "loss", "lr", "it_s", "eta_s", "epoch"}
    status = server.PromptServer.instance.of("comfyui-tuner.status")[-1]["text"]
    assert "crepa" not in status and "rollout" not in status


def orange(image) -> int:
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    return int((np.abs(pixels - np.array(CREPA_COLOUR)).sum(axis=1) < 40).sum())


def test_the_loss_plot_draws_the_crepa_term_as_a_second_line_only_when_there_is_one():
    plain = draw_loss_plot(HISTORY)
    assert orange(plain) == 0
    assert np.array_equal(np.asarray(plain), np.asarray(draw_loss_plot(HISTORY, crepa=[])))  # no CREPA: today's plot
    both = draw_loss_plot(HISTORY, crepa=CREPA)
    assert orange(both) > 500  # the line (over the plot's width) and its labels
    columns = np.nonzero((np.abs(np.asarray(both).astype(int) - np.array(CREPA_COLOUR)).sum(axis=2) < 40).any(axis=0))
    assert columns[0].min() < 70 and columns[0].max() > 600  # it spans the steps, as the loss does
    assert orange(draw_loss_plot(HISTORY, crepa=[[3, -0.4]])) > 0  # one step: a dot
    assert orange(draw_loss_plot(HISTORY, crepa=[[s, -0.4] for s in range(1, 5)])) > 0  # flat: no division by zero


def test_a_checkpoint_keeps_the_crepa_history_and_a_plain_one_has_none(tmp_path):
    def save(out, crepa):
        state = ckpt.TrainingState(2, {"epoch": 0, "position": 2}, [[1, 0.5], [2, 0.4]], "fp", crepa_history=crepa)
        return ckpt.save_checkpoint(out, state, adapter={"w": torch.zeros(2)}, states={}, spec_json="{}")

    with_crepa = save(tmp_path / "crepa", [[1, -0.25], [2, -0.3]])
    assert ckpt.load_checkpoint(with_crepa).state.crepa_history == [[1, -0.25], [2, -0.3]]
    plain = save(tmp_path / "plain", [])
    assert "crepa_history" not in json.loads((plain / "state.json").read_text())  # as before issue 17
    assert ckpt.load_checkpoint(plain).state.crepa_history == []
