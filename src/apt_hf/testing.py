"""Tiny stock LLaVA-1.5-, LLaVA-NeXT- and LLaVA-OneVision-shaped checkpoints built offline: for tests (apt_hf's and
yours), the demo and the CPU recipe.

Everything here is made locally (configs, random weights, a byte-level BPE tokenizer trained on a few
sentences, LLaVA-1.5's conversation format as a chat template), so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.utils import is_torchvision_available

from .processing_apt_llava import LLAVA_15_CHAT_TEMPLATE
from .processing_apt_llava_onevision import ImagesOnlyOnevisionProcessor

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"

_CORPUS = [
    "USER: What is shown in the image? ASSISTANT: A cat sitting on a red sofa next to a window.",
    "USER: Describe the photo in detail. ASSISTANT: The sky is blue and the grass is green; a rocket stands tall.",
    "USER: How many coins are there? ASSISTANT: There are twenty four coins on the table.",
    "USER: Is there a person in the picture? Answer yes or no. ASSISTANT: yes no Yes No",
    "What color is the cup of coffee? The coffee is brown and the cup is white with a saucer.",
    "the a an of in on at to is are was were be this that these those it its and or but with without",
    "0 1 2 3 4 5 6 7 8 9 . , ; : ! ? ' \" ( ) - + * / = < > [ ] { } \n",
]


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with LLaVA's special tokens and chat template, trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left", chat_template=LLAVA_15_CHAT_TEMPLATE,
    )
    return tokenizer


def tiny_vision_config(hidden_size: int = 32, layers: int = 2, heads: int = 4, image_size: int = 56,
                       patch_size: int = 14, intermediate_size: int | None = None) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, image_size=image_size, patch_size=patch_size, projection_dim=hidden_size,
    )


def tiny_llava_config(tokenizer: PreTrainedTokenizerFast, vision: CLIPVisionConfig | None = None,
                      text_hidden_size: int = 64, text_layers: int = 2, text_heads: int = 4,
                      intermediate_size: int | None = None) -> LlavaConfig:
    """LLaVA-1.5's wiring (CLIP tower, layer -2, CLS dropped, 2-layer GELU projector, Llama LM), any size."""
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden_size, intermediate_size=intermediate_size
        or 2 * text_hidden_size, num_hidden_layers=text_layers, num_attention_heads=text_heads,
        num_key_value_heads=text_heads, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision or tiny_vision_config(), text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )


def build_tiny_llava(seed: int = 0, vision: CLIPVisionConfig | None = None, **text_kwargs
                     ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised stock LLaVA and its LlavaProcessor, like llava-hf/llava-1.5-7b-hf but tiny."""
    tokenizer = build_tokenizer()
    config = tiny_llava_config(tokenizer, vision, **text_kwargs)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    side = config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_15_CHAT_TEMPLATE,
    )
    return model, processor


def save_tiny_llava(output_dir: str | Path, seed: int = 0, **kwargs) -> Path:
    """Write a tiny stock LLaVA checkpoint (model + processor) to `output_dir`."""
    model, processor = build_tiny_llava(seed, **kwargs)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return Path(output_dir)


def tiny_llava_next_pinpoints(tile: int = 56) -> list[list[int]]:
    """LLaVA-NeXT's anyres grid (1x2, 2x1, 2x2 tiles of 336 px, and more), here of `tile` px."""
    return [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]


def build_tiny_llava_next(seed: int = 0, image_size: int = 56, patch_size: int = 14,
                          pinpoints: list[list[int]] | None = None, vision: CLIPVisionConfig | None = None,
                          **text_kwargs) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A randomly initialised stock LLaVA-NeXT and its LlavaNextProcessor, like llava-hf/llava-v1.6-vicuna-7b-hf but
    tiny: LLaVA-1.5's wiring (CLIP tower of `image_size`-px tiles, layer -2, CLS dropped, Llama LM) with anyres
    `pinpoints` (default: 1x2, 2x1 and 2x2 tiles); `vision`: another tower (its image and patch sizes win)."""
    tokenizer = build_tokenizer()
    vision = vision or tiny_vision_config(image_size=image_size, patch_size=patch_size)
    image_size, patch_size = vision.image_size, vision.patch_size
    llava = tiny_llava_config(tokenizer, vision, **text_kwargs)
    pinpoints = pinpoints or tiny_llava_next_pinpoints(image_size)
    config = LlavaNextConfig(
        vision_config=llava.vision_config, text_config=llava.text_config, image_token_index=llava.image_token_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_grid_pinpoints=pinpoints, image_seq_length=(image_size // patch_size) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                                 crop_size={"height": image_size, "width": image_size},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_15_CHAT_TEMPLATE,
    )
    return model, processor


def tiny_onevision_pinpoints(tile: int = 60, max_tiles: int = 4) -> list[list[int]]:
    """OneVision's anyres grid (every (h, w) of 1..6 tiles of 384 px), here 1..max_tiles tiles of `tile` px."""
    sides = [tile * n for n in range(1, max_tiles + 1)]
    return [[h, w] for h in sides for w in sides]


def build_tiny_llava_onevision(seed: int = 0, image_size: int = 60, patch_size: int = 14, max_tiles: int = 4,
                               vision_aspect_ratio: str = "anyres_max_9", text_hidden_size: int = 64,
                               text_layers: int = 2, vision: SiglipVisionConfig | None = None,
                               pinpoints: list[list[int]] | None = None, text_heads: int = 4,
                               intermediate_size: int | None = None
                               ) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """A randomly initialised stock LLaVA-OneVision and its processor, like llava-hf/llava-onevision-qwen2-0.5b-ov-hf
    but tiny: a SigLIP tower whose tile side the patch does not tile (60 px at 14: the convolution sees 56 px, a 4 x 4
    grid, as so400m sees 378 of 384 px), a Qwen2 language model, anyres pinpoints of 1..max_tiles tiles a side (at 4,
    "anyres_max_9" shrinks the largest grids, as the 6 x 6 tiles of 384 px are shrunk).

    Without torchvision (which transformers' video processors need) the processor takes images and text only.
    """
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([VIDEO_TOKEN], special_tokens=True)
    vision = vision or SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                                          vision_use_head=False)
    image_size, patch_size = vision.image_size, vision.patch_size
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=text_hidden_size, intermediate_size=intermediate_size
        or 2 * text_hidden_size, num_hidden_layers=text_layers, num_attention_heads=text_heads,
        num_key_value_heads=max(1, text_heads // 2), max_position_embeddings=32768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    pinpoints = pinpoints or tiny_onevision_pinpoints(image_size, max_tiles)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN), image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=vision_aspect_ratio,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size},
                                                      image_grid_pinpoints=pinpoints)
    settings = {"num_image_tokens": (image_size // patch_size) ** 2, "vision_feature_select_strategy": "full",
                "vision_aspect_ratio": vision_aspect_ratio}
    if is_torchvision_available():
        from transformers import LlavaOnevisionVideoProcessor

        video_processor = LlavaOnevisionVideoProcessor(size={"height": image_size, "width": image_size})
        processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                            video_processor=video_processor, **settings)
    else:
        processor = ImagesOnlyOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer, **settings)
    return model, processor
