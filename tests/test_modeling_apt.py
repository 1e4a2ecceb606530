"""AptCLIPVisionModel / AptViTModel / AptViTForImageClassification against transformers' own models (fp32)."""

import math

import pytest
import torch
import torch.nn.functional as F
from exactness import assert_same_weights
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from apt_hf import AptCLIPVisionModel, AptViTForImageClassification, AptViTModel
from apt_hf.configuration_apt import AptCLIPVisionConfig, AptViTConfig
from apt_hf.image_processing_apt import AptImageProcessor
from apt_hf.modeling_apt import drop_cls_tokens, expand_to_grid, split_per_image
from apt_hf.patchify import PatchLayout, base_patch_index, unpack_base_patches
from apt_hf.sample_images import load_photos

ATOL = 1e-5
ATTN = ["eager", "sdpa", "flex_attention"]
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
CLIP_SIZE = {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}}  # 8 x 8 grid of 8 px
VIT_SIZE = {"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56},  # 7 x 7 grid of 8 px
            "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
MERGING = {"num_scales": 3, "thresholds": [5.0, 5.5]}  # merges at scales 1 and 2 on these photos at this size


@pytest.fixture(scope="module")
def photos():
    # Three photos: a few padded lengths only, so CPU flex attention compiles a few static shapes.
    return list(load_photos(("astronaut.png", "rocket.jpg", "hubble_deep_field.jpg")).values())


def stock_clip(attn: str = "sdpa", seed: int = 0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(**TINY, image_size=64, patch_size=8, attn_implementation=attn)
    return CLIPVisionModel(config).eval()


def stock_vit(attn: str = "sdpa", seed: int = 0, cls=ViTModel, **extra) -> ViTModel:
    torch.manual_seed(seed)
    config = ViTConfig(**TINY, image_size=56, patch_size=8, attn_implementation=attn, **extra)
    return cls(config).eval()


def dense_and_packed(photos, sizes: dict, **apt_fields):
    """Stock CLIP processor pixels (dense) and AptImageProcessor's packed BatchFeature for the same photos."""
    dense = CLIPImageProcessorPil(**sizes)(photos, return_tensors="pt")["pixel_values"]
    packed = AptImageProcessor(**sizes, patch_size=8, **apt_fields)(photos, return_tensors="pt")
    return dense, dict(packed)


def processed_images_of(batch) -> torch.Tensor:
    """The dense (B, C, H, W) images a packed batch holds."""
    layout = PatchLayout(*(batch[k] for k in PatchLayout.KEYS))
    return torch.stack(unpack_base_patches(batch["pixel_values"], layout))


def per_image(states: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return torch.stack(split_per_image(states, cu_seqlens))


# ------------------------------------------------------------------------------------------------------------------
# Exactness with nothing merged
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", ["clip", "vit"])
def test_nothing_merged_equals_stock(photos, family, attn):
    if family == "clip":
        stock, sizes = stock_clip(attn), CLIP_SIZE
        apt = AptCLIPVisionModel.from_clip(stock, thresholds=[-1], attn_implementation=attn)
    else:
        stock, sizes = stock_vit(attn), VIT_SIZE
        apt = AptViTModel.from_vit(stock, thresholds=[-1], attn_implementation=attn)
    assert apt.config._attn_implementation == attn
    dense, packed = dense_and_packed(photos, sizes, thresholds=[-1])
    with torch.no_grad():
        want = stock(dense, output_hidden_states=True)
        for inputs in (packed, {"pixel_values": dense}):
            got = apt(**inputs, output_hidden_states=True)
            assert got.last_hidden_state.shape == (1, want.last_hidden_state.numel() // 32, 32)
            assert got.cu_seqlens.dtype == torch.int32 and got.cu_seqlens.shape == (len(photos) + 1,)
            torch.testing.assert_close(per_image(got.last_hidden_state, got.cu_seqlens), want.last_hidden_state,
                                       atol=ATOL, rtol=0)
            torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=ATOL, rtol=0)
            assert len(got.hidden_states) == len(want.hidden_states) == 3
            for g, w in zip(got.hidden_states, want.hidden_states, strict=True):
                torch.testing.assert_close(per_image(g, got.cu_seqlens), w, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["clip", "vit"])
def test_other_image_sizes_interpolate_like_stock(family):
    """Non-native, non-square sizes: stock interpolate_pos_encoding behaviour; refused without it."""
    torch.manual_seed(1)
    if family == "clip":
        stock = stock_clip()
        apt = AptCLIPVisionModel.from_clip(stock, thresholds=[-1])
        x = torch.randn(2, 3, 48, 80)
    else:
        stock = stock_vit()
        apt = AptViTModel.from_vit(stock, thresholds=[-1])
        x = torch.randn(2, 3, 40, 72)
    with torch.no_grad():
        want = stock(x, interpolate_pos_encoding=True)
        got = apt(x, interpolate_pos_encoding=True)
    torch.testing.assert_close(per_image(got.last_hidden_state, got.cu_seqlens), want.last_hidden_state,
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        apt(x)


@pytest.mark.parametrize("family", ["clip", "vit"])
def test_sides_the_patch_does_not_tile_drop_their_last_pixels_as_stock(family):
    """A 60 px image at patch 8: the stock convolution sees the top-left 56 px (7 x 7 patches); so does APT."""
    torch.manual_seed(2)
    if family == "clip":
        stock = stock_clip()
        apt = AptCLIPVisionModel.from_clip(stock, thresholds=[-1])
    else:
        stock = stock_vit()
        apt = AptViTModel.from_vit(stock, thresholds=[-1])
    x = torch.randn(2, 3, 60, 68)
    with torch.no_grad():
        want = stock(x, interpolate_pos_encoding=True)
        got = apt(x, interpolate_pos_encoding=True)
    assert got.image_grid_hw.tolist() == [[7, 8]] * 2
    torch.testing.assert_close(per_image(got.last_hidden_state, got.cu_seqlens), want.last_hidden_state,
                               atol=ATOL, rtol=0)


def test_vit_classifier_equals_stock(photos):
    stock = stock_vit(cls=ViTForImageClassification, num_labels=5)
    apt = AptViTForImageClassification.from_vit(stock, thresholds=[-1])
    dense, packed = dense_and_packed(photos, VIT_SIZE, thresholds=[-1])
    labels = torch.arange(len(photos)) % 5
    with torch.no_grad():
        want = stock(dense, labels=labels)
        got = apt(**packed, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=0)
    assert got.cu_seqlens.tolist() == [50 * i for i in range(len(photos) + 1)]


def test_from_clip_accepts_full_clip_and_paths(tmp_path):
    torch.manual_seed(0)
    clip = CLIPModel(CLIPModel.config_class(vision_config={**TINY, "image_size": 64, "patch_size": 8},
                                            text_config={**TINY, "vocab_size": 99})).eval()
    clip.save_pretrained(tmp_path / "clip")
    from_object = AptCLIPVisionModel.from_clip(clip, thresholds=[-1])
    from_path = AptCLIPVisionModel.from_clip(str(tmp_path / "clip"), thresholds=[-1])
    for model in (from_object, from_path):
        for name, tensor in clip.vision_model.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), name
    assert not from_path.training


# ------------------------------------------------------------------------------------------------------------------
# Eq. 2 with merging, independence, grid view
# ------------------------------------------------------------------------------------------------------------------


def test_merged_token_embedding_is_resize_plus_position():
    """At init (ZeroMLP = 0): scale-s token = E(bilinear resize of its block to p) + pos_s; scale 0 = stock."""
    stock = stock_vit()
    apt = AptViTModel.from_vit(stock, num_scales=3, thresholds=[1.0, 1.0], image_mean=[0.5] * 3, image_std=[0.5] * 3)
    stock_embed = stock.embeddings
    torch.manual_seed(3)
    img = torch.rand(1, 3, 64, 64)  # 8 x 8 grid: flat 32 px block -> scale 2, flat 16 px blocks -> scale 1
    img[:, :, :32, :32] = 0.25
    img[:, :, 32:48, 32:48] = 0.75
    img = torch.round(img * 255) / 255
    x = (img - 0.5) / 0.5
    with torch.no_grad():
        out = apt(x, interpolate_pos_encoding=True, output_hidden_states=True)
    embeddings = out.hidden_states[0][0]
    scales, positions = out.patch_scales, out.patch_positions
    assert set(scales.tolist()) == {0, 1, 2}

    d, p, n = 32, 8, 7
    conv = stock_embed.patch_embeddings.projection
    table = stock_embed.position_embeddings[0, 1:].reshape(1, n, n, d).permute(0, 3, 1, 2)
    pos = {0: F.interpolate(table, size=(8, 8), mode="bicubic", align_corners=False)}
    for s in (1, 2):
        pos[s] = F.interpolate(table, size=(8 >> s, 8 >> s), mode="bicubic", align_corners=False, antialias=True)
    cls = stock_embed.cls_token[0, 0] + stock_embed.position_embeddings[0, 0]
    torch.testing.assert_close(embeddings[0], cls, atol=ATOL, rtol=0)
    for t, (s, (r, c)) in enumerate(zip(scales.tolist(), positions.tolist(), strict=True)):
        side = p << s
        block = x[:, :, r * p: r * p + side, c * p: c * p + side]
        if s:
            block = F.interpolate(block, size=(p, p), mode="bilinear", align_corners=False, antialias=False)
        want = conv(block).flatten() + pos[s][0, :, r >> s, c >> s]
        torch.testing.assert_close(embeddings[t + 1], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ATTN)
def test_outputs_do_not_depend_on_batch_mates(photos, attn):
    apt = AptCLIPVisionModel.from_clip(stock_clip(attn), attn_implementation=attn, **MERGING)
    torch.nn.init.normal_(apt.embeddings.zero_mlp.weight, std=0.1)  # exercise the merge branch too
    _, packed = dense_and_packed(photos, CLIP_SIZE, **MERGING)
    counts = packed["tokens_per_image"]
    assert len(set(counts.tolist())) > 1 and (counts < 64).any()
    with torch.no_grad():
        together = apt(**packed)
        alone = [apt(**dense_and_packed([photo], CLIP_SIZE, **MERGING)[1]) for photo in photos]
    for i, single in enumerate(alone):
        torch.testing.assert_close(split_per_image(together.last_hidden_state, together.cu_seqlens)[i],
                                   single.last_hidden_state[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(together.pooler_output[i], single.pooler_output[0], atol=ATOL, rtol=0)


def test_grid_view_and_helpers(photos):
    stock = stock_clip()
    apt = AptCLIPVisionModel.from_clip(stock, **MERGING)
    _, packed = dense_and_packed(photos, CLIP_SIZE, **MERGING)
    with torch.no_grad():
        out = apt(**packed)
    grid = out.to_grid()
    assert grid.shape == (len(photos), 64, 32)
    layout = PatchLayout(out.patch_scales, out.patch_positions, out.tokens_per_image, out.image_grid_hw)
    tokens = drop_cls_tokens(out.last_hidden_state, out.cu_seqlens)
    assert tokens.shape == (int(out.tokens_per_image.sum()), 32)
    cell, token = base_patch_index(layout)
    torch.testing.assert_close(grid.reshape(-1, 32)[cell], tokens[token])
    assert torch.equal(expand_to_grid(tokens, layout), grid)
    assert [t.shape[0] for t in out.per_image(drop_cls=True)] == out.tokens_per_image.tolist()
    # With nothing merged the grid view is the stock token map.
    flat = AptCLIPVisionModel.from_clip(stock, thresholds=[-1])
    dense, packed = dense_and_packed(photos, CLIP_SIZE, thresholds=[-1])
    with torch.no_grad():
        torch.testing.assert_close(flat(**packed).to_grid(), stock(dense).last_hidden_state[:, 1:], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------------


def _grads(model, inputs) -> dict[str, torch.Tensor]:
    model.zero_grad()
    out = model(**inputs)
    (out.pooler_output.square().sum() + out.last_hidden_state.square().mean()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_new_parameters_get_gradients_and_checkpointing_matches(photos):
    apt = AptCLIPVisionModel.from_clip(stock_clip(), **MERGING).train()
    names = [name for name, _ in apt.named_apt_parameters()]
    assert names == ["embeddings.merge_conv.weight", "embeddings.merge_conv.bias", "embeddings.zero_mlp.weight",
                     "embeddings.zero_mlp.bias"]
    assert len(apt.apt_parameters()) == 4
    assert not apt.embeddings.zero_mlp.weight.any() and not apt.embeddings.zero_mlp.bias.any()
    bound = 1 / math.sqrt(32 * 4)  # PyTorch's default Conv2d init
    assert apt.embeddings.merge_conv.weight.abs().max() <= bound and apt.embeddings.merge_conv.weight.std() > 0
    _, packed = dense_and_packed(photos, CLIP_SIZE, **MERGING)

    grads = _grads(apt, packed)
    assert grads["embeddings.zero_mlp.weight"].abs().sum() > 0
    assert "embeddings.merge_conv.weight" in grads  # reached, zero while the zero-MLP is zero
    torch.nn.init.normal_(apt.embeddings.zero_mlp.weight, std=0.1)
    grads = _grads(apt, packed)
    assert grads["embeddings.merge_conv.weight"].abs().sum() > 0
    assert grads["embeddings.patch_embedding.weight"].abs().sum() > 0

    getattr(apt, "activation_checkpointing_enable", apt.gradient_checkpointing_enable)()  # renamed in 5.2x
    checkpointed = _grads(apt, packed)
    assert checkpointed.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs(photos, dtype):
    apt = AptViTModel.from_vit(stock_vit(), **MERGING)
    _, packed = dense_and_packed(photos, VIT_SIZE, **MERGING)
    with torch.no_grad():
        want = apt(**packed).last_hidden_state
        got = apt.to(dtype)(**packed).last_hidden_state
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("side", [2, 4])
def test_merge_conv_is_the_convolution(side):
    """merge_conv runs as a matrix product over 2 x 2 blocks: the convolution's result and gradients."""
    from apt_hf.modeling_apt import PatchMergeConv

    torch.manual_seed(0)
    merge = PatchMergeConv(8)
    grid = torch.randn(5, 8, side, side, requires_grad=True)
    got = merge(grid)
    want = F.conv2d(grid, merge.weight, merge.bias, stride=2)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    (g_got,) = torch.autograd.grad(got.square().sum(), merge.weight)
    (g_want,) = torch.autograd.grad(want.square().sum(), merge.weight)
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "vit_classifier"])
def test_compiled_model_does_not_recompile_for_new_token_counts(kind):
    """torch.compile(model, dynamic=True): a batch with other token counts reuses the graphs, and the only graph
    breaks are the two documented boundaries (embedding/packing and attention, both outside compilation)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    photos = list(load_photos().values())
    if kind == "clip":
        apt, sizes = AptCLIPVisionModel.from_clip(stock_clip(), **MERGING), CLIP_SIZE
    else:
        torch.manual_seed(0)
        stock = ViTForImageClassification(ViTConfig(**TINY, image_size=64, patch_size=8, num_labels=3)).eval()
        apt, sizes = AptViTForImageClassification.from_vit(stock, **MERGING).eval(), CLIP_SIZE
    batches = [dense_and_packed(photos[i:i + 3], sizes, **MERGING)[1] for i in (0, 3, 6)]
    counts = [b["tokens_per_image"].tolist() for b in batches]
    assert len({str(c) for c in counts}) == 3 and all(sum(c) != sum(counts[0]) for c in counts[1:])
    assert all(int((b["patch_scales"] > 0).sum()) > 0 for b in batches)  # every batch merges
    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(apt, backend=counter, dynamic=True)
    output = "last_hidden_state" if kind == "clip" else "logits"
    with torch.no_grad():
        want = [apt(**b)[output] for b in batches]
        got = [compiled(**batches[0])[output]]
        frames_after_first = counter.frame_count
        got += [compiled(**b)[output] for b in batches[1:]]
    assert frames_after_first > 0 and counter.frame_count == frames_after_first, "recompiled for new token counts"
    assert not counters["recompiles"]
    breaks = list(counters["graph_break"])
    assert breaks and all("torch.compiler.disable" in reason for reason in breaks), breaks
    assert all(name in " ".join(breaks) for name in ("_embed_packed", "packed_attention"))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------------------------
# Attention maps, greyscale models
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["clip", "vit"])
def test_attention_maps_per_image_on_eager(photos, family):
    """output_attentions on eager: per layer, per image, (heads, L_i, L_i); the stock maps when nothing merges."""
    if family == "clip":
        stock, sizes = stock_clip("eager"), CLIP_SIZE
        convert = AptCLIPVisionModel.from_clip
    else:
        stock, sizes = stock_vit("eager"), VIT_SIZE
        convert = AptViTModel.from_vit
    flat = convert(stock, thresholds=[-1], attn_implementation="eager")
    dense, packed = dense_and_packed(photos, sizes, thresholds=[-1])
    with torch.no_grad():
        want = stock(dense, output_attentions=True).attentions
        got = flat(**packed, output_attentions=True).attentions
    assert len(got) == len(want) == 2 and all(len(layer) == len(photos) for layer in got)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(torch.stack(g), w, atol=ATOL, rtol=0)

    merging = convert(stock, attn_implementation="eager", **MERGING)
    merging.config.output_attentions = True  # the config route
    _, packed = dense_and_packed(photos, sizes, **MERGING)
    with torch.no_grad():
        out = merging(**packed)
    lengths = (out.tokens_per_image + 1).tolist()
    assert len(set(lengths)) > 1
    for layer in out.attentions:
        assert [tuple(a.shape) for a in layer] == [(4, n, n) for n in lengths]
        for a in layer:
            torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
    # Mapped back to base cells: the CLS row of the last layer, packed as (L, heads), through the grid view.
    cls_rows = torch.cat([a[:, 0].T for a in out.attentions[-1]])
    grid = out.to_grid(cls_rows)
    assert grid.shape == (len(photos), 64 if family == "clip" else 49, 4)
    first = out.attentions[-1][0][:, 0, 1:].T  # image 0: attention from CLS to its tokens, (T_0, heads)
    cell, token = base_patch_index(out.layout)
    in_first = cell < grid.shape[1]
    torch.testing.assert_close(grid[0][cell[in_first]], first[token[in_first]])


@pytest.mark.parametrize("route", ["kwarg", "config"])
def test_attention_maps_refused_where_the_backend_has_none(photos, route):
    apt = AptCLIPVisionModel.from_clip(stock_clip(), attn_implementation="eager", **MERGING)
    _, packed = dense_and_packed(photos[:2], CLIP_SIZE, **MERGING)
    kwargs = {"output_attentions": True} if route == "kwarg" else {}
    if route == "config":
        apt.config.output_attentions = True
    apt.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="output_attentions: attention maps come from attn_implementation='eager'"):
        apt(**packed, **kwargs)


def test_greyscale_vit_builds_trains_and_round_trips(tmp_path):
    """num_channels=1: defaults follow the channels, the processor and the dense path give the same layout (the
    photo scored as R = G = B), one training step runs, and a reload keeps weights and settings."""
    config = AptViTConfig(**TINY, num_channels=1, image_size=64, patch_size=8, num_labels=3, **MERGING)
    assert config.image_mean == [0.5] and config.image_std == [0.5]
    torch.manual_seed(0)
    model = AptViTForImageClassification(config)
    grey = [photo.convert("L") for photo in load_photos(("camera.png", "astronaut.png", "moon.png")).values()]
    processor = AptImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, patch_size=8,
                                  image_mean=[0.5], image_std=[0.5], do_convert_rgb=False, **MERGING)
    batch = processor(grey, return_tensors="pt")
    assert batch["pixel_values"].shape[1:] == (1, 8, 8) and (batch["patch_scales"] > 0).any()
    rgb = processor(grey, return_tensors="pt", do_convert_rgb=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for key in PatchLayout.KEYS:
        assert torch.equal(batch[key], rgb[key]), key  # greyscale is scored as the RGB photo with R = G = B
    dense = processed_images_of(batch)
    assert torch.equal(model(pixel_values=dense).patch_scales, batch["patch_scales"])

    model.train()
    loss = model(**batch, labels=torch.tensor([0, 1, 2])).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config.num_channels == 1 and reloaded.config.image_mean == [0.5]
    assert reloaded.config.apt_fields == model.config.apt_fields
    assert_same_weights(reloaded, model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)
    stock = ViTForImageClassification(ViTConfig(**TINY, num_channels=1, image_size=64, patch_size=8)).eval()
    assert AptViTForImageClassification.from_vit(stock).config.image_mean == [0.5]


def test_configs_changed_in_place_still_build():
    """As transformers' own tests do: a config the stock class accepts after in-place changes builds as it is."""
    config = AptViTConfig(**TINY, image_size=64, patch_size=8)
    config.num_labels = 1
    config.problem_type = "regression"
    config.num_channels = 1  # image_mean keeps 3 values: only the dense path's un-normalising needs them
    model = AptViTForImageClassification(config).eval()
    assert model.classifier.out_features == 1
    with pytest.raises(ValueError, match="image_mean"):
        model(pixel_values=torch.zeros(1, 1, 64, 64))
    packed = model(**AptImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                       patch_size=8, image_mean=[0.5], image_std=[0.5], do_convert_rgb=False)(
        [load_photos(("camera.png",), mode="L")["camera"]], return_tensors="pt"))
    assert packed.logits.shape == (1, 1)


# ------------------------------------------------------------------------------------------------------------------
# Attention implementation, saving, loading
# ------------------------------------------------------------------------------------------------------------------


def test_attn_implementation_switches_at_run_time(photos):
    apt = AptCLIPVisionModel.from_clip(stock_clip(), **MERGING)
    _, packed = dense_and_packed(photos, CLIP_SIZE, **MERGING)
    with torch.no_grad():
        reference = apt(**packed).last_hidden_state
        for attn in ("eager", "flex_attention", "sdpa"):
            apt.set_attn_implementation(attn)
            assert apt.config._attn_implementation == attn
            assert apt.encoder.layers[0].self_attn.config._attn_implementation == "apt_packed"
            torch.testing.assert_close(apt(**packed).last_hidden_state, reference, atol=ATOL, rtol=0)


def test_save_load_round_trip(tmp_path, photos):
    apt = AptViTForImageClassification.from_vit(stock_vit(cls=ViTForImageClassification, num_labels=3), **MERGING)
    torch.nn.init.normal_(apt.vit.embeddings.zero_mlp.weight, std=0.1)
    apt.save_pretrained(tmp_path)
    saved = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_apt.py", "modeling_apt_vit.py", "configuration_apt.py",
            "patchify.py"} <= saved
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, AptViTConfig) and config.thresholds == [5.0, 5.5] and config.num_scales == 3
    assert config.auto_map == {
        "AutoConfig": "configuration_apt.AptViTConfig",
        "AutoModel": "modeling_apt_vit.AptViTModel",
        "AutoModelForImageClassification": "modeling_apt_vit.AptViTForImageClassification",
    }
    _, packed = dense_and_packed(photos, VIT_SIZE, **MERGING)
    with torch.no_grad():
        want = apt(**packed)
        loaded = AutoModelForImageClassification.from_pretrained(tmp_path, attn_implementation="eager")
        assert type(loaded) is AptViTForImageClassification and loaded.config._attn_implementation == "eager"
        torch.testing.assert_close(loaded(**packed).logits, want.logits, atol=ATOL, rtol=0)
        base = AutoModel.from_pretrained(tmp_path)
        assert type(base) is AptViTModel
        torch.testing.assert_close(base(**packed).last_hidden_state, apt.vit(**packed).last_hidden_state,
                                   atol=ATOL, rtol=0)
    clip = AptCLIPVisionModel.from_clip(stock_clip(), **MERGING)
    clip.save_pretrained(tmp_path / "clip")
    again = AptCLIPVisionModel.from_pretrained(tmp_path / "clip")
    assert isinstance(again.config, AptCLIPVisionConfig)
    for name, tensor in clip.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_input_setup(photos):
    apt = AptCLIPVisionModel.from_clip(stock_clip(), **MERGING)
    return apt, dense_and_packed(photos[:2], CLIP_SIZE, **MERGING)


def _edited(packed, **changes):
    return {**packed, **changes}


@pytest.mark.parametrize("case, match", [
    ("too_small", "at least patch_size=8"),
    ("other_size", "interpolate_pos_encoding=True"),
    ("channels_dense", "expected 3 channels"),
    ("channels_packed", "expected 3 channels"),
    ("missing_keys", "missing"),
    ("counts", "tokens_per_image"),
    ("off_grid", "patch_positions"),
    ("scale_too_big", "patch_scales"),
    ("patch_count", "base patches"),
    ("patch_shape", r"\(N, 3, 8, 8\)"),
    ("float_keys", "integer tensor"),
])
def test_bad_input_raises_clear_error(bad_input_setup, case, match):
    apt, (dense, packed) = bad_input_setup
    scales = packed["patch_scales"]
    inputs = {
        "too_small": {"pixel_values": dense[:, :, :6, :6]},
        "other_size": {"pixel_values": F.pad(dense, (0, 8, 0, 8))},
        "channels_dense": {"pixel_values": dense[:, :2]},
        "channels_packed": _edited(packed, pixel_values=packed["pixel_values"][:, :1]),
        "missing_keys": {"pixel_values": packed["pixel_values"], "patch_scales": scales},
        "counts": _edited(packed, tokens_per_image=packed["tokens_per_image"] + 1),
        "off_grid": _edited(packed, patch_positions=packed["patch_positions"] + 8),
        "scale_too_big": _edited(packed, patch_scales=torch.full_like(scales, 3)),
        "patch_count": _edited(packed, pixel_values=packed["pixel_values"][:-1]),
        "patch_shape": _edited(packed, pixel_values=packed["pixel_values"].reshape(-1, 3, 4, 16)),
        "float_keys": _edited(packed, patch_scales=scales.float()),
    }[case]
    with pytest.raises(ValueError, match=match):
        apt(**inputs)


@pytest.mark.parametrize("attn, match", [
    ("flash_attention_2", "flash-attn"),
    ("varlen", "varlen"),
    ("apt_varlen", "varlen"),
    ("apt_packed", "internal"),
])
def test_unavailable_attn_implementation_says_what_to_install(attn, match):
    if attn == "flash_attention_2" and torch.cuda.is_available():
        pytest.skip("CUDA present: flash-attn may be installable here")
    if "varlen" in attn and torch.cuda.is_available():
        pytest.skip("CUDA present: varlen may be available")
    apt = AptCLIPVisionModel.from_clip(stock_clip())
    with pytest.raises(ValueError, match=match):
        apt.set_attn_implementation(attn)
    with pytest.raises(ValueError, match=match):
        AptCLIPVisionModel(AptCLIPVisionConfig(**TINY, image_size=64, patch_size=8, attn_implementation=attn))


def test_default_attn_is_fastest_available():
    from transformers.utils import is_flash_attn_2_available

    apt = AptCLIPVisionModel(AptCLIPVisionConfig(**TINY, image_size=64, patch_size=8))
    chosen = apt.config._attn_implementation
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        assert chosen == "sdpa"
    elif is_flash_attn_2_available():
        assert chosen == "flash_attention_2"
    else:
        assert chosen in ("apt_varlen", "sdpa")


def test_conversion_refuses_wrong_models():
    with pytest.raises(ValueError, match="CLIPVisionModel"):
        AptCLIPVisionModel.from_clip(stock_vit())
    with pytest.raises(ValueError, match="ViTModel"):
        AptViTModel.from_vit(stock_clip())
    with pytest.raises(ValueError, match="thresholds"):
        AptViTModel.from_vit(stock_vit(), num_scales=3, thresholds=[1.0])


def test_convert_script_end_to_end(tmp_path, photos):
    """scripts/convert_to_apt.py on local CLIP and ViT checkpoints: with nothing merged, the stock outputs."""
    import importlib.util
    from pathlib import Path

    from transformers import ViTImageProcessorPil

    from apt_hf.image_processing_apt import AptImageProcessorPil

    spec = importlib.util.spec_from_file_location(
        "convert_to_apt", Path(__file__).parents[1] / "scripts" / "convert_to_apt.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    clip = stock_clip()
    clip.save_pretrained(tmp_path / "clip")
    clip_processor = CLIPImageProcessorPil(**CLIP_SIZE)
    clip_processor.save_pretrained(tmp_path / "clip")
    vit = stock_vit(cls=ViTForImageClassification, num_labels=3)
    vit.save_pretrained(tmp_path / "vit")
    vit_processor = ViTImageProcessorPil(size={"height": 56, "width": 56})
    vit_processor.save_pretrained(tmp_path / "vit")
    cases = [(clip, clip_processor, "clip", AutoModel), (vit, vit_processor, "vit", AutoModelForImageClassification)]
    for stock, stock_processor, name, auto in cases:
        out = script.main(["--model", str(tmp_path / name), "--output_dir", str(tmp_path / f"apt_{name}"),
                           "--thresholds", "-1"])
        model = auto.from_pretrained(out)
        processor = AptImageProcessorPil.from_pretrained(out)
        assert model.config.thresholds == [-1.0] and processor.patch_size == 8
        with torch.no_grad():
            want = stock(stock_processor(photos, return_tensors="pt")["pixel_values"])
            got = model(**processor(photos, return_tensors="pt"))
        key = "pooler_output" if name == "clip" else "logits"
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0)


def test_flex_document_mask_matches_torch_create_block_mask():
    """The block-level document mask equals torch's create_block_mask (which materialises the full mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from apt_hf.packed_attention import document_block_mask

    for lengths in ([65, 65, 65], [56, 59, 14], [300, 1, 2, 128, 129, 500], [128, 128]):
        cu_seqlens = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()
        mask = document_block_mask(cu_seqlens, torch.device("cpu"))
        length = mask.seq_lengths[0]
        assert length % 128 == 0 and length - sum(lengths) < 128
        doc = F.pad(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)),
                    (0, length - sum(lengths)), value=len(lengths))
        ref = create_block_mask(lambda b, h, q, k, doc=doc: doc[q] == doc[k], None, None, length, length,
                                device="cpu")
        assert torch.equal(mask.to_dense(), ref.to_dense())
        assert torch.equal(mask.full_kv_num_blocks, ref.full_kv_num_blocks)


def test_conversion_from_paths_is_quiet_about_keys_dropped_by_design(tmp_path, capfd, caplog):
    """A full CLIP's text tower and a classifier's head are dropped silently; weights initialised fresh are named."""
    from transformers import CLIPConfig, CLIPModel

    clip = CLIPModel(CLIPConfig(text_config=dict(TINY), vision_config={**TINY, "image_size": 64, "patch_size": 8},
                                projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    stock_vit(cls=ViTForImageClassification, num_labels=3).save_pretrained(tmp_path / "vit")
    capfd.readouterr()
    AptCLIPVisionModel.from_clip(str(tmp_path / "clip"))
    AptViTForImageClassification.from_vit(str(tmp_path / "vit"))
    quiet = capfd.readouterr()
    assert "LOAD REPORT" not in quiet.out + quiet.err and "text_model" not in quiet.out + quiet.err
    assert not [r for r in caplog.records if r.levelno >= 30]
    AptViTModel.from_vit(str(tmp_path / "vit"))
    said = capfd.readouterr()
    assert "LOAD REPORT" not in said.out + said.err
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= 30]
    assert "pooler.dense" in warning and "initialised fresh" in warning
