"""Property-based: every processor input and every training record gives a correct result or a clear ValueError.

Derandomized with fixed example counts, so the README's figures are reproducible: `pytest tests/test_properties.py
-q -s` prints them. A "correct result" from the processor means pixels bit-identical to transformers' own processor;
any exception other than ValueError fails the test.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import CLIPImageProcessorPil

from apt_hf.image_processing_apt import AptImageProcessorPil
from apt_hf.patchify import PatchLayout, unpack_base_patches

PROCESSOR_EXAMPLES = 500
RECORD_EXAMPLES = 500
OUTCOMES: dict[str, Counter] = {"processor": Counter(), "records": Counter()}
def fixed(examples: int) -> settings:
    return settings(derandomize=True, deadline=None, database=None, max_examples=examples,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])

# -- processor inputs ---------------------------------------------------------------------------------------------
PIL_MODES = ("RGB", "L", "RGBA", "P", "CMYK", "I;16", "1", "LA", "F")


@st.composite
def images(draw: st.DrawFn) -> object:
    h, w = draw(rarely(st.integers(1, 70), st.just(0))), draw(rarely(st.integers(1, 70), st.just(0)))
    kind = draw(rarely(st.sampled_from(["pil", "pil", "uint8", "float01", "float255", "int64", "tensor", "chw",
                                        "gray2d"]), st.sampled_from(["int16_wide", "nan", "bf16", "none", "bool"])))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "none":
        return None
    if kind == "pil":
        mode = draw(st.sampled_from(PIL_MODES))
        h, w = max(h, 1), max(w, 1)
        base = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        return base.convert(mode) if mode not in ("I;16", "F") else Image.fromarray(
            rng.integers(0, 256 if mode == "F" else 65536, (h, w)).astype(np.float32 if mode == "F" else np.uint16))
    shape = (h, w, 3)
    if kind == "uint8":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if kind == "float01":
        return rng.random(shape, dtype=np.float32)
    if kind == "float255":
        return (rng.random(shape) * 255).astype(np.float32)
    if kind == "int64":
        return rng.integers(0, 256, shape, dtype=np.int64)
    if kind == "int16_wide":
        return rng.integers(-5, 4000, shape).astype(np.int16)
    if kind == "nan":
        x = rng.random(shape, dtype=np.float32)
        if x.size:
            x.flat[0] = np.nan
        return x
    if kind == "tensor":
        return torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
    if kind == "bf16":
        return torch.rand(3, h, w).bfloat16()
    if kind == "chw":
        return rng.integers(0, 256, (3, h, w), dtype=np.uint8)
    if kind == "bool":
        return rng.random(shape) > 0.5
    return rng.integers(0, 256, (h, w), dtype=np.uint8)  # gray2d


def rarely(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly valid values, sometimes invalid ones (1 in 12), so both outcomes are well covered."""
    return st.integers(0, 11).flatmap(lambda i: invalid if i == 11 else valid)


@st.composite
def processor_cases(draw: st.DrawFn) -> tuple[dict, object]:
    p = draw(st.sampled_from([4, 7, 8, 14]))
    side = p * draw(st.integers(1, 6))
    num_scales = draw(rarely(st.sampled_from([1, 2, 3]), st.sampled_from([0, "2", 4])))
    valid_thresholds = st.lists(st.floats(-2, 8, allow_nan=False), min_size=max(0, num_scales - 1),
                                max_size=max(0, num_scales - 1)) if isinstance(num_scales, int) else st.none()
    thresholds = draw(rarely(st.one_of(st.none(), valid_thresholds), st.one_of(
        st.lists(st.floats(-2, 8, allow_nan=False), max_size=4),
        st.sampled_from([5.75, "5.5", [float("nan")], [float("inf")], [True]]))))
    kwargs = {
        "size": {"shortest_edge": side + draw(st.sampled_from([0, 3]))},
        "crop_size": {"height": side, "width": side * draw(st.sampled_from([1, 2]))},
        "do_center_crop": draw(st.booleans()),
        "patch_size": draw(rarely(st.sampled_from([p, (p, p)]), st.sampled_from([None, 0, "8", p + 1]))),
        "num_scales": num_scales, "thresholds": thresholds,
        "scorer": draw(rarely(st.sampled_from(["entropy", "laplacian", "upsample_mse"]), st.just("sobel"))),
        "entropy_bins": draw(rarely(st.sampled_from([512, 2, 256, 65536]), st.sampled_from([1, 10**6, 5.5]))),
    }
    n = draw(rarely(st.integers(1, 3), st.just(0)))
    items = [draw(images()) for _ in range(n)]
    nesting = draw(rarely(st.sampled_from(["list", "single", "nested"]), st.just("empty_nested")))
    if nesting == "single" and items:
        inputs: object = items[0]
    elif nesting == "nested":
        inputs = [items]
    elif nesting == "empty_nested":
        inputs = [[] for _ in range(max(n, 1))]
    else:
        inputs = items
    return kwargs, inputs


def _stock_pixels(kwargs: dict, inputs: object) -> torch.Tensor:
    stock_kwargs = {k: v for k, v in kwargs.items() if k in ("size", "crop_size", "do_center_crop")}
    return CLIPImageProcessorPil(**stock_kwargs)(inputs, return_tensors="pt")["pixel_values"]


@fixed(PROCESSOR_EXAMPLES)
@given(processor_cases())
def test_processor_inputs_give_stock_pixels_or_a_value_error(case: tuple[dict, object]) -> None:
    kwargs, inputs = case
    try:
        processor = AptImageProcessorPil(**{k: v for k, v in kwargs.items() if v is not None or k != "thresholds"})
        batch = processor(inputs, return_tensors="pt")
    except ValueError:
        OUTCOMES["processor"]["clear error"] += 1
        return
    layout = PatchLayout.from_inputs(batch)
    if int(layout.tokens_per_image.numel()) == 0:
        OUTCOMES["processor"]["empty (text-only) batch"] += 1
        return
    got = unpack_base_patches(batch["pixel_values"], layout)
    flat = flatten(inputs)
    assert len(got) == len(flat)
    p = processor.patch_size
    for image, pixels in zip(flat, got, strict=True):  # one image at a time: stock cannot stack mixed sizes
        stock = _stock_pixels(kwargs, image)[0]
        height, width = (stock.shape[-2] // p) * p, (stock.shape[-1] // p) * p  # what the stock p x p conv sees
        assert torch.equal(pixels, stock[:, :height, :width])
    OUTCOMES["processor"]["correct output"] += 1


def flatten(inputs: object) -> list:
    if isinstance(inputs, (list, tuple)):
        return [image for item in inputs for image in flatten(item)]
    return [inputs]


# -- training records ---------------------------------------------------------------------------------------------
TEXT = st.text(alphabet="abc <>.\n", max_size=12)
BAD_VALUES = st.one_of(st.integers(), st.none(), st.lists(TEXT, max_size=2), st.dictionaries(TEXT, st.integers(),
                                                                                         max_size=1))


@st.composite
def records(draw: st.DrawFn) -> object:
    """A valid record of either schema, then at most one mutation (a wrong type, role, count or shape)."""
    with_image = draw(st.booleans())
    question = ("<image>\n" if with_image else "") + draw(TEXT)
    if draw(st.booleans()):
        record: dict = {"id": draw(TEXT), "conversations": [{"from": "human", "value": question},
                                                            {"from": "gpt", "value": draw(TEXT)}]}
        if with_image:
            record["image"] = "0000.png"
        turns, content = record["conversations"], "value"
    else:
        parts = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": draw(TEXT)}]
        record = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": draw(TEXT)}]}
        if with_image:
            record["images"] = ["0000.png"]
        turns, content = record["messages"], "content"
    mutation = draw(st.sampled_from(["none"] * 6 + ["value", "turn", "turns", "role", "no_answer", "image",
                                                    "record", "part"]))
    key = "conversations" if "conversations" in record else "messages"
    if mutation == "value":
        turns[0][content] = draw(BAD_VALUES)
    elif mutation == "turn":
        turns[0] = draw(st.one_of(TEXT, st.integers(), st.lists(st.integers(), max_size=2)))
    elif mutation == "turns":
        record[key] = draw(st.one_of(TEXT, st.dictionaries(TEXT, TEXT, max_size=2), st.integers()))
    elif mutation == "role":
        turns[0]["from" if key == "conversations" else "role"] = draw(st.sampled_from(["robot", 3, None]))
    elif mutation == "no_answer":
        del turns[1]
    elif mutation == "image":
        record["image" if key == "conversations" else "images"] = draw(st.one_of(st.integers(), st.just(
            ["0000.png", "0000.png"]), st.just("missing.png")))
    elif mutation == "record":
        return draw(st.one_of(st.lists(st.integers(), max_size=2), TEXT, st.integers()))
    elif mutation == "part" and key == "messages":
        turns[0]["content"] = [draw(st.one_of(TEXT, st.fixed_dictionaries({"type": st.just("video")})))]
    return record


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("records")
    Image.new("RGB", (28, 28), "red").save(folder / "0000.png")
    return folder


@fixed(RECORD_EXAMPLES)
@given(rows=st.lists(records(), min_size=1, max_size=3), jsonl=st.booleans(), garbage_line=rarely(st.just(False),
                                                                                              st.just(True)))
def test_training_records_load_or_give_a_value_error(image_folder, rows, jsonl, garbage_line) -> None:
    from apt_hf.tasks.llava.data import load_training_dataset

    path = image_folder / ("data.jsonl" if jsonl else "data.json")
    if jsonl:
        lines = [json.dumps(r) for r in rows] + (["{not json"] if garbage_line else [])
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text(json.dumps(rows))
    try:
        dataset = load_training_dataset(str(path), str(image_folder))
    except ValueError as err:
        assert "data_path" in str(err) or "image_folder" in str(err)
        OUTCOMES["records"]["clear error"] += 1
        return
    assert len(dataset) == len(rows)
    OUTCOMES["records"]["loaded"] += 1


def test_report_outcomes() -> None:
    """Prints the tallies the README's Reliability section quotes (run after the property tests)."""
    for name, counts in OUTCOMES.items():
        print(f"{name}: {sum(counts.values())} inputs, " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    assert all(sum(counts.values()) > 0 for counts in OUTCOMES.values())
