"""Saved APT settings reload exactly (through apt_hf and as remote code); remote code imports nothing else.

Defaults fill absent fields only: a `[5.5]` LLaVA checkpoint must not come back at LLaVA-1.5's `[5.75]`, and a
3-scale one must load at all.
"""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import CLIPVisionConfig, LlavaConfig

from apt_hf import AptCLIPVisionConfig, AptLlavaConfig, AptViTConfig
from apt_hf.testing import save_tiny_llava

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": 64, "patch_size": 8}
TEXT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 128}
SETTINGS = {
    "s2_5.5": {"num_scales": 2, "thresholds": [5.5]},
    "s3": {"num_scales": 3, "thresholds": [5.5, 4.0]},
    "laplacian": {"num_scales": 2, "thresholds": [0.05], "scorer": "laplacian", "entropy_bins": 256},
}


def build(kind: str, fields: dict):
    if kind == "clip":
        return AptCLIPVisionConfig(**TINY, **fields)
    if kind == "vit":
        return AptViTConfig(**TINY, **fields, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4])
    return AptLlavaConfig(vision_config=AptCLIPVisionConfig(**TINY, **fields), text_config=TEXT,
                          vision_feature_layout="grid")


def apt_settings(config) -> dict:
    vision = getattr(config, "vision_config", config)
    out = {k: getattr(vision, k) for k in ("num_scales", "thresholds", "scorer", "entropy_bins", "image_mean",
                                           "image_std")}
    return {**out, "layout": getattr(config, "vision_feature_layout", None)}


REMOTE = textwrap.dedent("""
    import sys
    sys.modules["apt_hf"] = None  # everything must come from the saved folders
    import json
    from transformers import AutoConfig

    out = {}
    for folder in sys.argv[1:]:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        vision = getattr(config, "vision_config", config)
        out[folder] = {k: getattr(vision, k) for k in ("num_scales", "thresholds", "scorer", "entropy_bins",
                                                       "image_mean", "image_std")}
        out[folder]["layout"] = getattr(config, "vision_feature_layout", None)
        out[folder]["module"] = type(config).__module__
    print(json.dumps(out))
""")


def test_non_default_settings_survive_save_and_reload(tmp_path):
    folders, expected = [], {}
    for kind in ("clip", "vit", "llava"):
        for name, fields in SETTINGS.items():
            config = build(kind, fields)
            folder = tmp_path / f"{kind}_{name}"
            config.save_pretrained(folder)
            reloaded = type(config).from_pretrained(folder)
            assert apt_settings(reloaded) == apt_settings(config), (kind, name)
            assert apt_settings(reloaded)["thresholds"] == fields["thresholds"]
            folders.append(str(folder))
            expected[str(folder)] = apt_settings(config)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", REMOTE, *folders], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    for folder, settings in expected.items():
        assert remote[folder].pop("module").startswith("transformers_modules."), folder
        assert remote[folder] == settings, folder


def test_llava_defaults_fill_absent_fields_only():
    stock_tower = CLIPVisionConfig(**TINY)
    converted = AptLlavaConfig(vision_config=stock_tower.to_dict(), text_config=TEXT)
    assert converted.thresholds == [5.75]  # LLaVA-1.5's setting for a stock tower
    assert AptLlavaConfig(vision_config=stock_tower, text_config=TEXT, num_scales=3).thresholds == [5.5, 4.0]
    assert AptLlavaConfig(vision_config=stock_tower, text_config=TEXT, scorer="laplacian").thresholds == [0.087]
    saved = AptLlavaConfig(vision_config=AptCLIPVisionConfig(**TINY, thresholds=[5.5]), text_config=TEXT)
    assert AptLlavaConfig(**saved.to_dict()).thresholds == [5.5]  # a saved APT tower keeps its own
    assert AptLlavaConfig(**saved.to_diff_dict()).thresholds == [5.5]
    assert type(AptLlavaConfig().vision_config) is AptCLIPVisionConfig
    assert AptLlavaConfig().vision_config.image_size == LlavaConfig().vision_config.image_size == 336


def test_replace_apt_fields_validates_and_keeps_the_old_values_on_error():
    config = build("llava", SETTINGS["s2_5.5"])
    config.replace_apt_fields(num_scales=3)
    assert config.thresholds == [5.5, 4.0]  # the new scale count's default, not the old list
    with pytest.raises(ValueError, match="thresholds"):
        config.replace_apt_fields(thresholds="5.5")
    with pytest.raises(ValueError, match="image_mean"):
        config.replace_apt_fields(image_mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="entropy_bins"):
        config.replace_apt_fields(entropy_bins=10**6)
    with pytest.raises(ValueError, match="patch_size"):
        config.replace_apt_fields(patch_size=16)
    assert apt_settings(config)["thresholds"] == [5.5, 4.0] and config.entropy_bins == 512


def _imported_modules(path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def test_remote_code_imports_only_stdlib_torch_transformers_and_itself(tmp_path):
    """The files save_pretrained copies (model and processor) import only what a bare transformers user has."""
    save_tiny_llava(tmp_path / "llava")
    from apt_hf import AptLlavaForConditionalGeneration, AptLlavaProcessor

    AptLlavaForConditionalGeneration.from_llava(str(tmp_path / "llava")).save_pretrained(tmp_path / "apt")
    AptLlavaProcessor.from_llava_processor(str(tmp_path / "llava")).save_pretrained(tmp_path / "apt")
    code = {p.stem: p for p in (tmp_path / "apt").glob("*.py")}
    assert {"modeling_apt_llava", "modeling_apt", "packed_attention", "configuration_apt", "patchify",
            "image_processing_apt", "processing_apt_llava"} <= set(code)
    assert_saved_code_imports_only_allowed(code)


def assert_saved_code_imports_only_allowed(code: dict[str, Path]) -> None:
    """Each saved module imports the standard library, torch, transformers, numpy (transformers' own dependency:
    its image processors need it) or a module saved beside it; nothing else."""
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "numpy"}
    for stem, path in code.items():
        for module, level in _imported_modules(path):
            if level:
                assert module.split(".")[0] in code, f"{stem}.py imports .{module}, which is not saved beside it"
            else:
                assert module.split(".")[0] in allowed, f"{stem}.py imports {module}"


def test_processor_defaults_come_from_the_same_table():
    from apt_hf import AptImageProcessorPil

    assert AptImageProcessorPil().thresholds == [5.75]  # LLaVA-1.5 at 336/14
    assert AptImageProcessorPil(num_scales=3).thresholds == [5.5, 4.0]
    assert AptImageProcessorPil(scorer="upsample_mse").thresholds == [0.000303]
    with pytest.raises(ValueError, match="thresholds"):
        AptImageProcessorPil(num_scales=4)
