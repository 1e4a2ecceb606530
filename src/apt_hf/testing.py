"""Tiny stock LLaVA-1.5-shaped checkpoints built offline: for tests (apt_hf's and yours), the demo and the CPU recipe.

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
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .processing_apt_llava import LLAVA_15_CHAT_TEMPLATE

IMAGE_TOKEN = "<image>"

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
