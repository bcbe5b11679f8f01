"""TREAD token routing on Kandinsky 5: config checks, exact routing semantics, engine end to end.

The routed forward is compared with an independent hand-written reference (advanced indexing
instead of gather/scatter, the diffusers blocks called one by one) so that routing the tokens
without their RoPE rows, or with other indices, is caught.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from helpers.datasets import lumina_spec, write_dataset
from helpers.measure import eval_loss, prepared_trainer
from safetensors.torch import load_file

from trainer_core.errors import ConfigError
from trainer_core.events import ListSink
from trainer_core.families import get_family_class
from trainer_core.lora.adapters import add_lora, lora_config
from trainer_core.routing.kandinsky5 import tread_routing
from trainer_core.routing.tread import (
    TokenGrid,
    TreadRoute,
    check_tread,
    keep_first_frame,
    parse_routes,
    route_warnings,
    select_kept_tokens,
)
from trainer_core.spec import LoraSpec, TrainSpec
from trainer_core.train.engine import Trainer

ROUTE = {"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}
BLOCKS = 6


def config(*routes: tuple[float, int, int]) -> dict:
    return {"routes": [{"selection_ratio": r, "start_layer_idx": s, "end_layer_idx": e} for r, s, e in routes]}


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def make_transformer(blocks: int = BLOCKS, seed: int = 0):
    from diffusers import Kandinsky5Transformer3DModel

    from trainer_core.testing.tiny import randomize_zero_init

    torch.manual_seed(seed)
    t = Kandinsky5Transformer3DModel(
        in_visual_dim=16,
        out_visual_dim=16,
        in_text_dim=32,
        in_text_dim2=32,
        time_dim=32,
        patch_size=(1, 2, 2),
        model_dim=48,
        ff_dim=96,
        num_text_blocks=1,
        num_visual_blocks=blocks,
        axes_dims=(8, 8, 8),
    )
    randomize_zero_init(t, seed=seed)
    return t.train()


def inputs(batch: int = 2, frames: int = 1, size: int = 8, seed: int = 0) -> dict:
    """Transformer kwargs for ``batch`` latents of (frames, size, size, 16): (size / 2)^2 tokens per frame."""
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, frames, size, size, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, 5, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "timestep": torch.rand(batch, generator=g) * 1000,
        "visual_rope_pos": [torch.arange(frames), torch.arange(size // 2), torch.arange(size // 2)],
        "text_rope_pos": torch.arange(5),
        "return_dict": False,
    }


def routed(t, kw: dict, cfg: dict, seed: int = 0, **extra):
    """(output, kept ids per route) of one routed forward call."""
    with tread_routing(t, cfg, generator=torch.Generator().manual_seed(seed), **extra) as router:
        out = t(**kw)
    return out, (router.kept if router is not None else None)


def reference(t, kw: dict, routes: list[TreadRoute], kept: list[torch.Tensor], rope_follows: bool = True):
    """The routed forward written out by hand: block by block, tokens picked by advanced indexing.

    ``rope_follows=False`` routes the tokens but hands the routed blocks the first rows of the RoPE
    table instead of the kept tokens' own rows: what a router that forgot the RoPE would compute.
    """
    text = t.text_embeddings(kw["encoder_hidden_states"])
    time = t.time_embeddings(kw["timestep"]) + t.pooled_text_embeddings(kw["pooled_projections"])
    visual = t.visual_embeddings(kw["hidden_states"])
    text_rope = t.text_rope_embeddings(kw["text_rope_pos"]).unsqueeze(0)
    for block in t.text_transformer_blocks:
        text = block(text, time, text_rope)
    shape = visual.shape[:-1]
    rope = t.visual_rope_embeddings(shape, kw["visual_rope_pos"]).flatten(1, 3)
    visual = visual.flatten(1, 3)
    rows = torch.arange(visual.shape[0])[:, None]
    starts = {r.start: (r, ids) for r, ids in zip(routes, kept)}
    current = None
    for i, block in enumerate(t.visual_transformer_blocks):
        if i in starts:
            route, ids = starts[i]
            saved = visual
            visual = visual[rows, ids]
            block_rope = rope[rows, ids] if rope_follows else rope[:, : ids.shape[1]]
            current = (route, ids, saved, block_rope)
        if current is None:
            visual = block(visual, text, time, rope, None)
            continue
        route, ids, saved, block_rope = current
        visual = block(visual, text, time, block_rope, None)
        if i == route.end:
            full = saved.clone()
            full[rows, ids] = visual
            visual, current = full, None
    return t.out_layer(visual.reshape(*shape, -1), text, time)


# ---------------------------------------------------------------------- config
def test_negative_indices_resolve_against_the_visual_blocks_and_routes_sort():
    assert parse_routes(config((0.5, 2, -2)), 32) == [TreadRoute(0.5, 2, 30)]
    assert parse_routes(config((0.3, -10, -3), (0.2, 2, 8)), 32) == [TreadRoute(0.2, 2, 8), TreadRoute(0.3, 22, 29)]
    assert parse_routes(config((0.5, 3, 3)), 6) == [TreadRoute(0.5, 3, 3)]  # one block
    assert TreadRoute(0.5, 0, 0).keep_count(16) == 8 and TreadRoute(0.25, 0, 0).keep_count(10) == 8
    assert TreadRoute(0.99, 0, 0).keep_count(4) == 1  # never empty


@pytest.mark.parametrize(
    "cfg, match",
    [
        (config((0.5, 2, 10), (0.3, 10, 20)), "overlap"),
        (config((0.5, 2, 10), (0.3, -25, -2)), "overlap"),  # blocks 2..10 and 7..30 of 32
        (config((0.5, 10, 4)), "after"),
        (config((0.5, -4, 20)), "after"),  # -4 is block 28
        (config((0.0, 2, -2)), r"selection_ratio .* \(0, 1\)"),
        (config((1.0, 2, -2)), r"selection_ratio .* \(0, 1\)"),
        (config((-0.2, 2, -2)), r"selection_ratio .* \(0, 1\)"),
        (config((0.5, 2, 40)), "outside the model's 32 visual blocks"),
        (config((0.5, -33, -2)), "outside the model's 32 visual blocks"),
        (config((0.5, 2.0, -2)), "must be an integer"),
        ({"routes": []}, "non-empty list"),
        ({"route": [ROUTE]}, "unknown key"),
        ({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2}]}, "missing 'end_layer_idx'"),
        ({"routes": [{**ROUTE, "l1_reg": 0.1}]}, "unknown key.*l1_reg"),
    ],
)
def test_invalid_configs_are_refused_naming_tread_config(cfg, match):
    with pytest.raises(ConfigError, match=match) as e:
        parse_routes(cfg, 32)
    assert str(e.value).startswith("tread_config:") and "How to fix" in str(e.value)


def spec_with(family: str, cfg: dict | None) -> TrainSpec:
    return TrainSpec.model_validate({"model": {"model_family": family}, "routing": {"tread_config": cfg}})


def test_check_tread_refuses_lumina2_and_bad_routes_before_any_model_loads():
    lumina, k5 = get_family_class("lumina2"), get_family_class("kandinsky5-image")
    assert not lumina.supports_tread and k5.supports_tread
    with pytest.raises(ConfigError, match="tread_config: TREAD token routing is not available for lumina2"):
        check_tread(spec_with("lumina2", config((0.3, 2, -2))), lumina)
    assert check_tread(spec_with("lumina2", None), lumina) == []
    assert check_tread(spec_with("kandinsky5-image", config((0.25, 2, -2))), k5) == []
    for bad, match in ((config((0.3, 8, 4)), "after"), (config((0.3, 2, 8), (0.3, 5, 9)), "overlap")):
        with pytest.raises(ConfigError, match=match):
            check_tread(spec_with("kandinsky5-image", bad), k5)


def test_warnings_for_high_ratios_and_routes_through_the_first_or_last_blocks():
    k5 = get_family_class("kandinsky5-image")
    (w,) = check_tread(spec_with("kandinsky5-image", config((0.5, 2, -2))), k5)
    assert "selection_ratio 0.5" in w and "0.35" in w
    assert check_tread(spec_with("kandinsky5-image", config((0.35, 2, -2))), k5) == []
    warnings = route_warnings(config((0.2, 1, -1)))
    assert len(warnings) == 2 and "start_layer_idx 1" in warnings[0] and "end_layer_idx -1" in warnings[1]
    assert route_warnings(config((0.2, 2, 31)), num_blocks=32)[0].startswith("tread_config routes[0]: end")
    assert route_warnings(config((0.2, -32, 29)), num_blocks=32)[0].startswith("tread_config routes[0]: start")
    assert route_warnings(config((0.2, -30, 30)), num_blocks=32) == []


# ---------------------------------------------------------------------- token choice
def test_selection_is_seeded_sorted_and_keeps_the_same_share_of_every_frame():
    route, grid = TreadRoute(0.5, 0, 0), TokenGrid(batch=2, frames=3, per_frame=16)
    ids = select_kept_tokens(route, grid, torch.Generator().manual_seed(1))
    assert ids.shape == (2, 24) and ids.dtype == torch.long
    assert torch.equal(ids, ids.sort(dim=1).values)
    assert torch.equal(torch.bincount(ids[0] // 16, minlength=3), torch.tensor([8, 8, 8]))
    assert not torch.equal(ids[0], ids[1])  # each sample draws its own tokens
    assert torch.equal(ids, select_kept_tokens(route, grid, torch.Generator().manual_seed(1)))
    assert not torch.equal(ids, select_kept_tokens(route, grid, torch.Generator().manual_seed(2)))


def test_force_keep_keeps_the_whole_first_frame_for_i2v():
    grid = TokenGrid(batch=2, frames=3, per_frame=16)
    ids = select_kept_tokens(TreadRoute(0.5, 0, 0), grid, torch.Generator().manual_seed(0), keep_first_frame(grid))
    assert ids.shape == (2, 16 + 8 + 8)
    assert torch.equal(ids[:, :16], torch.arange(16).expand(2, 16))
    assert torch.equal(torch.bincount(ids[1] // 16, minlength=3), torch.tensor([16, 8, 8]))


# ---------------------------------------------------------------------- routed forward
@pytest.fixture(scope="module")
def model():
    return make_transformer()


def test_routing_keeps_the_shape_and_changes_the_training_output(model):
    kw = inputs()
    plain = model(**kw)
    out, kept = routed(model, kw, config((0.5, 2, -2)))
    assert out.shape == plain.shape == kw["hidden_states"].shape
    assert [k.shape for k in kept] == [(2, 8)]  # 16 tokens per image, half dropped
    assert not torch.allclose(out, plain, atol=1e-4)
    assert model.gradient_checkpointing is False and model._gradient_checkpointing_func is None  # restored


def test_inference_is_untouched_bit_for_bit(model):
    kw, cfg = inputs(), config((0.5, 2, -2))
    with torch.no_grad():
        plain = model(**kw)
        out, kept = routed(model, kw, cfg)  # training mode, grad off: not routed
        assert kept is None and torch.equal(out, plain)
        model.eval()
        try:
            out, kept = routed(model, kw, cfg)
            assert kept is None and torch.equal(out, plain)
        finally:
            model.train()
    model.eval()
    try:
        assert torch.equal(routed(model, kw, cfg)[0], model(**kw))  # eval mode with grad on: not routed
    finally:
        model.train()


def test_a_route_that_keeps_every_token_changes_nothing(model):
    kw = inputs()
    out, kept = routed(model, kw, config((0.01, 2, -2), (0.01, 5, 5)))  # round(16 * 0.01) = 0 dropped
    assert [k.tolist() for k in kept] == [[list(range(16))] * 2] * 2
    assert torch.equal(out, model(**kw))


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize(
    "cfg",
    [config((0.5, 2, -2)), config((0.5, 1, 2), (0.25, 3, 3), (0.75, -1, -1))],
    ids=["one-route", "chained"],
)
def test_routed_forward_equals_the_hand_written_reference(cfg, checkpointing):
    t = make_transformer()
    if checkpointing:
        t.enable_gradient_checkpointing()
    kw = inputs(frames=2)
    out, kept = routed(t, kw, cfg, seed=3)
    routes = parse_routes(cfg, BLOCKS)
    assert len(kept) == len(routes) and [k.shape[1] for k in kept] == [r.keep_count(16) * 2 for r in routes]
    with torch.no_grad():
        torch.testing.assert_close(out, reference(t, kw, routes, kept), rtol=1e-5, atol=1e-5)
        wrong_rope = reference(t, kw, routes, kept, rope_follows=False)
    assert not torch.allclose(out, wrong_rope, atol=1e-3)  # the check above would catch unrouted RoPE


def lora_transformer():
    t = make_transformer()
    add_lora(t, lora_config(LoraSpec(lora_rank=4), ["to_query", "to_key", "to_value", "feed_forward.out_layer"]))
    return t


def lora_grads(t, loss: torch.Tensor) -> dict[int, float]:
    """Total |grad| of the lora_B weights of each visual block for ``loss``."""
    t.zero_grad(set_to_none=True)
    loss.backward()
    return {
        i: sum(float(p.grad.abs().sum()) for n, p in b.named_parameters() if "lora_B" in n and p.grad is not None)
        for i, b in enumerate(t.visual_transformer_blocks)
    }


def test_gradients_reach_routed_blocks_through_kept_tokens_only():
    t = lora_transformer()
    kw = inputs()
    out, (ids,) = routed(t, kw, config((0.5, 2, -1)))  # blocks 2..5: dropped tokens skip to the output
    kept = torch.zeros(2, 16, dtype=torch.bool)
    kept[torch.arange(2)[:, None], ids] = True
    pixels = kept.view(2, 1, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)[..., None]  # 2x2 patches
    from_dropped = lora_grads(t, (out * ~pixels).square().sum())
    assert all(from_dropped[i] == 0.0 for i in (2, 3, 4, 5)) and from_dropped[0] > 0 and from_dropped[1] > 0
    out, _ = routed(t, kw, config((0.5, 2, -1)))
    from_kept = lora_grads(t, (out * pixels).square().sum())
    assert all(from_kept[i] > 0 for i in range(BLOCKS))


def test_gradient_checkpointing_gives_the_same_gradients_with_two_passes_before_backward():
    """Two forward passes (as predict makes for two caption lengths), then one backward: recomputing
    the checkpointed blocks must use each pass's own routed tensors."""
    grads = []
    for checkpointing in (False, True):
        t = lora_transformer()
        if checkpointing:
            t.enable_gradient_checkpointing()
        kw_a, kw_b = inputs(seed=1), inputs(seed=2)
        kw_b["encoder_hidden_states"] = kw_b["encoder_hidden_states"][:, :3]
        kw_b["text_rope_pos"] = torch.arange(3)
        with tread_routing(t, config((0.5, 2, -2)), generator=torch.Generator().manual_seed(0)):
            loss = t(**kw_a).square().mean() + t(**kw_b).square().mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in t.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6, msg=n)


# ---------------------------------------------------------------------- family and engine
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny K5 T2I pipeline with a 6-visual-block transformer, so a 2..-2 route has blocks to skip."""
    from diffusers import Kandinsky5Transformer3DModel

    from trainer_core.testing.tiny import build_tiny_kandinsky5_image, randomize_zero_init

    folder = build_tiny_kandinsky5_image(tmp_path_factory.mktemp("k5"))
    cfg = dict(Kandinsky5Transformer3DModel.load_config(folder / "transformer"))
    cfg["num_visual_blocks"] = BLOCKS
    torch.manual_seed(0)
    t = Kandinsky5Transformer3DModel.from_config(cfg)
    randomize_zero_init(t)
    t.save_pretrained(folder / "transformer", safe_serialization=True)
    return folder


def test_family_predict_routes_only_while_training(tiny, monkeypatch):
    from trainer_core.routing import kandinsky5 as routing

    spec = TrainSpec.model_validate(
        {
            "model": {"model_family": "kandinsky5-image", "pretrained_model_name_or_path": str(tiny)},
            "routing": {"tread_config": config((0.5, 2, -2))},
        }
    )
    fam = get_family_class("kandinsky5-image")(spec)
    t = fam.load_transformer(torch.device("cpu"), torch.float32).train()
    kw = inputs(batch=2)
    text = {
        "prompt_embeds": kw["encoder_hidden_states"],
        "pooled_prompt_embeds": kw["pooled_projections"],
        "prompt_lengths": torch.tensor([5, 3]),  # two forward passes
    }
    noisy, sigma = kw["hidden_states"], torch.tensor([0.3, 0.8])
    routers = []
    original = routing.Kandinsky5Router.__enter__

    def spy(self):
        routers.append(self)
        return original(self)

    monkeypatch.setattr(routing.Kandinsky5Router, "__enter__", spy)
    torch.manual_seed(5)
    a = fam.predict(t, noisy, sigma, text)
    torch.manual_seed(5)
    b = fam.predict(t, noisy, sigma, text)
    assert len(routers) == 2 and len(routers[0].kept) == 1  # one route, kept ids of the last pass
    assert torch.equal(a, b)  # tokens come from the global generator, which the engine seeds per step
    with torch.no_grad():
        plain = fam.predict(t, noisy, sigma, text)
        t.eval()
        assert torch.equal(fam.predict(t, noisy, sigma, text), plain)
    assert len(routers) == 2 and not torch.allclose(a, plain, atol=1e-4)


def tread_spec(tiny: Path, data: Path, out: Path, **training) -> TrainSpec:
    return TrainSpec.model_validate(
        lumina_spec(
            tiny,
            data,
            out,
            model={"model_family": "kandinsky5-image", "pretrained_model_name_or_path": str(tiny)},
            routing={"tread_config": config((0.5, 2, -2))},
            training={"seed": 0, **training},
            optimizer={"optimizer": "adamw", "learning_rate": 1e-2},
            lora={"lora_rank": 4, "lora_alpha": 8, "lora_target_preset": "attention+ffn"},
        )
    )


def test_it_trains_through_the_engine_and_the_loss_falls(tiny, tmp_path, monkeypatch):
    from trainer_core.routing import kandinsky5 as routing

    data = write_dataset(tmp_path / "data", {"a": "a red circle", "b": "a large red circle on a plain background"})
    spec = tread_spec(tiny, data, tmp_path / "out", max_train_steps=40, train_batch_size=2)
    spec.checkpointing.checkpoint_step_interval = None
    trainer = prepared_trainer(spec)
    before = eval_loss(trainer)
    kept: list[torch.Tensor] = []
    start = routing.Kandinsky5Router._start

    def spy(self, *args):
        route = start(self, *args)
        kept.append(route.ids)
        return route

    monkeypatch.setattr(routing.Kandinsky5Router, "_start", spy)
    result = trainer.train()
    after = eval_loss(trainer)
    assert result.steps == 40 and after < 0.85 * before, (before, after)
    assert len(kept) == 80 and all(ids.shape == (1, 8) for ids in kept)  # 2 caption lengths per step, 16 -> 8


def test_resume_with_tread_equals_the_uninterrupted_run(tiny, tmp_path):
    data = write_dataset(tmp_path / "data", {"a": "a red circle", "b": "a blue circle", "c": "a green circle"})
    overrides = {"max_train_steps": 6, "gradient_checkpointing": True}
    straight = Trainer(tread_spec(tiny, data, tmp_path / "straight", **overrides)).run()
    cancel = threading.Event()

    class CancelAtStep3(ListSink):
        def emit(self, type, **payload):
            super().emit(type, **payload)
            if type == "progress" and payload["step"] == 3:
                cancel.set()

    spec = tread_spec(tiny, data, tmp_path / "split", **overrides)
    first = Trainer(spec, CancelAtStep3(), cancel=cancel).run()
    assert first.cancelled and first.steps == 3
    second = Trainer(spec, ListSink()).run()
    assert second.resumed_from.name == "step-3" and second.steps == 6
    assert [h[1] for h in second.loss_history] == pytest.approx([h[1] for h in straight.loss_history], rel=1e-5)
    a = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "split" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
