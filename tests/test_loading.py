"""`load_apt_llava`: the one way training, evaluation and benchmarks get an APT-LLaVA and its processor."""

import pytest

from apt_hf.loading import check_model_and_processor, load_apt_llava
from apt_hf.testing import save_tiny_llava


@pytest.fixture(scope="module")
def stock_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("stock") / "llava")


def test_stock_checkpoint_is_converted_with_the_given_fields(stock_dir):
    model, processor, converted = load_apt_llava(str(stock_dir), apt_fields={"num_scales": 3},
                                                 vision_feature_layout="grid")
    assert converted and type(model).__name__ == "AptLlavaForConditionalGeneration"
    assert model.config.thresholds == processor.image_processor.thresholds == [5.5, 4.0]  # the table's default
    assert model.config.vision_feature_layout == processor.vision_feature_layout == "grid"
    assert model.config.vision_config.image_mean == list(processor.image_processor.image_mean)


def test_apt_checkpoint_keeps_its_settings_and_takes_validated_overrides(stock_dir, tmp_path):
    model, processor, _ = load_apt_llava(str(stock_dir), apt_fields={"thresholds": [5.5]})
    model.save_pretrained(tmp_path / "apt")
    processor.save_pretrained(tmp_path / "apt")
    model, processor, converted = load_apt_llava(str(tmp_path / "apt"))
    assert not converted and model.config.thresholds == processor.image_processor.thresholds == [5.5]
    model, processor, _ = load_apt_llava(str(tmp_path / "apt"), apt_fields={"scorer": "laplacian"},
                                         vision_feature_layout="grid")
    assert model.config.thresholds == processor.image_processor.thresholds == [0.087]
    assert processor.vision_feature_layout == "grid"
    for bad, match in (({"thresholds": [1.0, 2.0]}, "thresholds"), ({"entropy_bins": 1}, "entropy_bins"),
                       ({"image_std": [0.0, 1.0, 1.0]}, "image_std"), ({"patch_size": 7}, "patch_size")):
        with pytest.raises(ValueError, match=match):
            load_apt_llava(str(tmp_path / "apt"), apt_fields=bad)
    with pytest.raises(ValueError, match="vision_feature_layout"):
        load_apt_llava(str(tmp_path / "apt"), vision_feature_layout="dense")


def test_model_and_processor_must_agree(stock_dir):
    model, processor, _ = load_apt_llava(str(stock_dir))
    processor.image_processor.replace_apt_fields(thresholds=[4.0])
    with pytest.raises(ValueError, match="thresholds: the model uses"):
        check_model_and_processor(model, processor)
    processor.image_processor.replace_apt_fields(thresholds=[5.75], patch_size=7)
    with pytest.raises(ValueError, match="patch_size: the model uses"):
        check_model_and_processor(model, processor)
    processor.image_processor.replace_apt_fields(patch_size=model.config.vision_config.patch_size)
    processor.image_processor.image_mean = [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="image_mean"):
        check_model_and_processor(model, processor)


def test_processor_replace_apt_fields_changes_nothing_on_error(stock_dir):
    _, processor, _ = load_apt_llava(str(stock_dir))
    with pytest.raises(ValueError, match="thresholds"):
        processor.replace_apt_fields(num_scales=2, thresholds="5.5")
    with pytest.raises(ValueError, match="vision_feature_layout"):
        processor.replace_apt_fields(vision_feature_layout="dense", thresholds=[1.0])
    with pytest.raises(ValueError, match="colour"):
        processor.replace_apt_fields(colour="red")
    assert processor.image_processor.thresholds == [5.75] and processor.vision_feature_layout == "packed"
