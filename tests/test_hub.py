"""Publishing: the upload set of scripts/push_to_hub.py, its model card, remote-code loading, and the upload itself
up to the HTTP boundary (the Hub is unreachable here: huggingface_hub's own client runs on an httpx mock transport).
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard, constants
from huggingface_hub.errors import LocalTokenNotFoundError
from huggingface_hub.utils import _http as hub_http
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook
from safetensors.torch import load_file
from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTForImageClassification

import apt_hf
from apt_hf import (
    AptCLIPVisionModel,
    AptImageProcessorPil,
    AptLlavaForConditionalGeneration,
    AptLlavaProcessor,
    AptViTForImageClassification,
)
from apt_hf.hub import collect_upload_set, publish, upload, validate_repo_id
from apt_hf.model_card import CardOptions, parse_lmms_eval_results
from apt_hf.sample_images import load_photos
from apt_hf.testing import build_tiny_llava, save_tiny_llava, tiny_vision_config

# The HTTP client huggingface_hub talks through: httpx up to 1.x, its API-compatible fork httpx2 from 2.0.
httpx = getattr(hub_http, "httpx2", None) or hub_http.httpx

REPO = "me/apt-tiny"
TOKEN = "hf_SENTINELtoken0123456789"  # a fake token: must reach the Authorization header and nowhere else
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "push_to_hub.py"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
REMOTE_CODE = {"configuration_apt.py", "modeling_apt.py", "modeling_apt_clip.py", "modeling_apt_llava.py",
               "modeling_apt_vlm.py", "packed_attention.py", "patchify.py", "image_processing_apt.py",
               "processing_apt_llava.py", "processing_apt_vlm.py"}
VISION_CODE = {"configuration_apt.py", "modeling_apt.py", "packed_attention.py", "patchify.py",
               "image_processing_apt.py"}  # plus the family's own modeling file
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
SIZES = {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}}

# lmms-eval's aggregated results file, as evaluator.simple_evaluate + EvaluationTracker.save_results_aggregated
# write it (two tasks, one stderr "N/A" as lmms-eval writes when it has none).
LMMS_RESULTS = {
    "results": {
        "gqa": {"alias": "gqa", "exact_match,none": 0.6121, "exact_match_stderr,none": 0.0043},
        "pope": {"alias": "pope", "pope_accuracy,none": 0.8613, "pope_accuracy_stderr,none": "N/A",
                 "pope_f1_score,none": 0.8532, "pope_f1_score_stderr,none": "N/A"},
    },
    "group_subtasks": {"pope": [], "gqa": []},
    "configs": {
        "gqa": {"task": "gqa", "dataset_path": "lmms-lab/GQA", "dataset_name": "testdev_balanced_instructions",
                "test_split": "testdev", "output_type": "generate_until", "num_fewshot": 0,
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
                "metadata": [{"version": 0.0}]},
        "pope": {"task": "pope", "dataset_path": "lmms-lab/POPE", "test_split": "test",
                 "output_type": "generate_until", "num_fewshot": 0,
                 "metric_list": [{"metric": "pope_accuracy", "aggregation": "mean", "higher_is_better": True},
                                 {"metric": "pope_f1_score", "aggregation": "mean", "higher_is_better": True}],
                 "metadata": [{"version": 0.0}]},
    },
    "versions": {"gqa": "Yaml", "pope": "Yaml"},
    "n-shot": {"gqa": 0, "pope": 0},
    "higher_is_better": {"gqa": {"exact_match": True}, "pope": {"pope_accuracy": True, "pope_f1_score": True}},
    "n-samples": {"gqa": {"original": 12578, "effective": 12578}, "pope": {"original": 9000, "effective": 9000}},
    "config": {"model": "apt_llava", "model_args": "pretrained=/ckpt/apt-llava", "batch_size": "1", "batch_sizes": [],
               "device": None, "use_cache": None, "limit": None, "bootstrap_iters": 100000, "gen_kwargs": "",
               "random_seed": 0, "numpy_seed": 1234, "torch_seed": 1234, "fewshot_seed": 1234},
    "git_hash": "0a1b2c3", "date": "20260101_120000", "task_hashes": {}, "model_source": "apt_llava",
    "model_name": "/ckpt/apt-llava", "model_name_sanitized": "__ckpt__apt-llava", "system_instruction": None,
    "system_instruction_sha": None, "fewshot_as_multiturn": False, "chat_template": None, "chat_template_sha": None,
    "start_time": 10.0, "end_time": 20.0, "total_evaluation_time_seconds": "10.0",
    # what lmms-eval's summarize_logged_metrics makes of the apt_llava model's log_metrics calls
    "throughput": {"total_gen_tokens": 2048, "total_elapsed_time": 100.0, "avg_speed": 20.48,
                   "avg_num_images": 200.0, "avg_images_per_second": 2.0, "avg_visual_tokens_per_image": 380.2,
                   "avg_grid_tokens_per_image": 576.0, "avg_lm_image_tokens_per_image": 380.2,
                   "avg_kept_token_ratio": 0.66, "avg_gqa/images_per_second": 2.1, "avg_gqa/visual_tokens_per_image":
                   370.0, "avg_gqa/grid_tokens_per_image": 576.0, "avg_gqa/kept_token_ratio": 0.6424,
                   "avg_gqa/lm_image_tokens_per_image": 370.0},
    "usage": {},
}
SPEED = [{"model": "LLaVA-1.5 (stock)", "visual tokens": 576, "throughput (img/s)": 10.0},
         {"model": "APT-LLaVA", "visual tokens": 380, "throughput (img/s)": 13.9}]


def expected_scores(results: dict) -> set[tuple]:
    """(dataset id, task, metric, value) of every numeric aggregated metric, read straight off the JSON."""
    out = set()
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if key != "alias" and not metric.endswith("_stderr") and isinstance(value, (int, float)):
                out.add((results["configs"][task]["dataset_path"], task, metric, value))
    return out


def run_cli(*args: str) -> int:
    spec = importlib.util.spec_from_file_location("push_to_hub_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


def listing(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# -- checkpoints ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A saved tiny APT-LLaVA + processor, plus what a training run leaves next to them."""
    stock, processor = build_tiny_llava(vision=tiny_vision_config(image_size=112))
    model = AptLlavaForConditionalGeneration.from_llava(stock, thresholds=[5.75]).eval()
    apt_processor = AptLlavaProcessor.from_llava_processor(processor, thresholds=[5.75])
    path = tmp_path_factory.mktemp("llava")
    model.save_pretrained(path)
    apt_processor.save_pretrained(path)
    torch.save({"lr": 1e-4}, path / "training_args.bin")
    torch.save({"state": {}}, path / "optimizer.pt")
    (path / "checkpoint-10").mkdir()
    (path / "checkpoint-10" / "model.safetensors").write_bytes(b"old")
    (path / "trainer_state.json").write_text("{}")
    (path / "README.md").write_text("old card")
    return path, model, apt_processor


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    """Saved tiny APT-CLIP and APT-ViT classifier, each with its APT image processor."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("vision")
    apt = {"num_scales": 2, "thresholds": [5.5]}
    clip = AptCLIPVisionModel.from_clip(CLIPVisionModel(CLIPVisionConfig(**TINY, image_size=64, patch_size=8)), **apt)
    vit = AptViTForImageClassification.from_vit(
        ViTForImageClassification(ViTConfig(**TINY, image_size=64, patch_size=8, num_labels=3)), **apt)
    processor = AptImageProcessorPil(**SIZES, patch_size=8, **apt)
    for name, model in (("clip", clip), ("vit", vit)):
        model.eval().save_pretrained(root / name)
        processor.save_pretrained(root / name)
    return root, clip, vit, processor


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "20260101_120000_results.json"
    path.write_text(json.dumps(LMMS_RESULTS, indent=2))
    return path


@pytest.fixture(scope="module")
def llava_dry_run(llava, eval_file, tmp_path_factory):
    """The CLI's dry run of the LLaVA folder, with eval results and a speed table."""
    path, _, _ = llava
    out = tmp_path_factory.mktemp("dry") / "llava"
    speed = tmp_path_factory.mktemp("speed") / "speed.json"
    speed.write_text(json.dumps(SPEED))
    rc = run_cli("--model_dir", path, "--repo_id", REPO, "--private", "--eval_results", eval_file, "--dry_run",
                 "--local_dir", out, "--base_model", "llava-hf/llava-1.5-7b-hf", "--datasets",
                 "liuhaotian/LLaVA-Instruct-150K", "--speed_table", speed)
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def vision_dry_runs(vision, tmp_path_factory):
    root, *_ = vision
    out = tmp_path_factory.mktemp("dry_vision")
    for name in ("clip", "vit"):
        publish(root / name, f"me/apt-{name}", dry_run=True, local_dir=out / name)
    return out


# -- the dry-run folder ---------------------------------------------------------------------------------------------
def test_llava_dry_run_folder_is_the_upload_set(llava_dry_run, llava):
    files = listing(llava_dry_run)
    assert files == {"README.md", "config.json", "generation_config.json", "model.safetensors",
                     "processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                     *REMOTE_CODE}
    assert not [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    path, model, _ = llava
    weights = load_file(llava_dry_run / "model.safetensors")
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    for name in REMOTE_CODE:  # the code the checkpoint was saved with
        assert (llava_dry_run / name).read_bytes() == (path / name).read_bytes()

    config = json.loads((llava_dry_run / "config.json").read_text())
    processor = json.loads((llava_dry_run / "processor_config.json").read_text())
    auto_map = {**config["auto_map"], **processor["auto_map"], **processor["image_processor"]["auto_map"]}
    assert auto_map["AutoImageProcessor"] == {"pil": "image_processing_apt.AptImageProcessorPil",
                                              "torchvision": "image_processing_apt.AptImageProcessor"}
    targets = [auto_map[c] for c in ("AutoConfig", "AutoModelForImageTextToText", "AutoProcessor")]
    for target in [*targets, *auto_map["AutoImageProcessor"].values()]:
        module, class_name = target.split(".")
        assert f"class {class_name}(" in (llava_dry_run / f"{module}.py").read_text(), target


def test_llava_card_metadata_and_results_match_lmms_eval(llava_dry_run):
    card = ModelCard.load(llava_dry_run / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-text-to-text"
    assert data.base_model == "llava-hf/llava-1.5-7b-hf" and data.datasets == ["liuhaotian/LLaVA-Instruct-150K"]
    assert data.license == "llama2" and "apt" in data.tags
    got = {(r.dataset_type, r.dataset_name, r.metric_type, r.metric_value) for r in data.eval_results}
    assert got == expected_scores(LMMS_RESULTS)
    assert {r.source_name for r in data.eval_results} == {"lmms-eval"}
    gqa = next(r for r in data.eval_results if r.dataset_name == "gqa")
    assert (gqa.dataset_config, gqa.dataset_split) == ("testdev_balanced_instructions", "testdev")
    text = card.text
    assert "trust_remote_code=True" in text and 'repo_id = "me/apt-tiny"' in text
    assert "| thresholds (`thresholds`) | 5.75 |" in text and "entropy" in text and "2: patches of 14, 28 px" in text
    assert "| gqa | exact_match | 0.6121 | 0.0043 |" in text and "| pope | pope_accuracy | 0.8613 |  |" in text
    assert "| model | visual tokens | throughput (img/s) |" in text and "| APT-LLaVA | 380 | 13.9 |" in text
    assert "arXiv:2510.18091" in text and "Choudhury" in text and "ICLR 2026" in text
    assert "| all tasks | 2 | 380.2 | 576 | 66.0% | 380.2 |" in text  # tokens kept, as apt_llava logged them
    assert "| gqa | 2.1 | 370 | 576 | 64.2% | 370 |" in text


def test_vision_dry_runs_hold_their_auto_classes_and_cards(vision_dry_runs):
    for name, pipeline_tag, auto_classes in (
        ("clip", "image-feature-extraction", ("AutoConfig", "AutoModel")),
        ("vit", "image-classification", ("AutoConfig", "AutoModel", "AutoModelForImageClassification")),
    ):
        folder = vision_dry_runs / name
        assert listing(folder) == {"README.md", "config.json", "model.safetensors", "preprocessor_config.json",
                                   *VISION_CODE, f"modeling_apt_{name}.py"}
        config = json.loads((folder / "config.json").read_text())
        assert set(auto_classes) <= set(config["auto_map"])
        image_map = json.loads((folder / "preprocessor_config.json").read_text())["auto_map"]
        assert image_map["AutoImageProcessor"] == {"pil": "image_processing_apt.AptImageProcessorPil",
                                                   "torchvision": "image_processing_apt.AptImageProcessor"}
        card = ModelCard.load(folder / "README.md")
        assert card.data.pipeline_tag == pipeline_tag and card.data.library_name == "transformers"
        assert "apt" in card.data.tags and card.data.eval_results is None
        assert "trust_remote_code=True" in card.text and "| thresholds (`thresholds`) | 5.5 |" in card.text


def test_upload_set_matches_what_save_pretrained_writes(llava, tmp_path):
    """save_pretrained (what model.push_to_hub / processor.push_to_hub upload) writes the same remote-code set."""
    path, model, processor = llava
    fresh = tmp_path / "fresh"
    model.save_pretrained(fresh)
    processor.save_pretrained(fresh)
    upload_set = collect_upload_set(path, tmp_path / "work", repo_id=REPO)
    assert {p for p in upload_set.paths if p.endswith(".py")} == {p.name for p in fresh.glob("*.py")} == REMOTE_CODE
    assert set(upload_set.paths) - {"README.md"} == {p.name for p in fresh.iterdir()}
    assert not any("auto_map completed" in f.role for f in upload_set.files)  # nothing had to be patched
    assert {name for name, _ in upload_set.skipped} == {"README.md", "checkpoint-10/", "optimizer.pt",
                                                        "trainer_state.json", "training_args.bin"}
    assert "training_args.bin: pickle: never uploaded" in upload_set.listing()


def test_auto_map_gaps_are_filled_and_missing_code_is_taken_from_apt_hf(llava, tmp_path):
    path, _, _ = llava
    folder = tmp_path / "gappy"
    shutil.copytree(path, folder, ignore=shutil.ignore_patterns("checkpoint-*", "*.bin", "*.pt"))
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]["AutoModelForImageTextToText"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "patchify.py").unlink()
    upload_set = collect_upload_set(folder, tmp_path / "work", repo_id=REPO)
    by_path = {f.path_in_repo: f for f in upload_set.files}
    assert "auto_map completed" in by_path["config.json"].role
    written = json.loads(by_path["config.json"].source.read_text())
    assert written["auto_map"]["AutoModelForImageTextToText"] == "modeling_apt_llava.AptLlavaForConditionalGeneration"
    package = Path(apt_hf.__file__).parent
    assert {by_path[name].source.parent for name in REMOTE_CODE} == {package}  # one version, never mixed
    assert any("AutoModelForImageTextToText" in note for note in upload_set.notes)

    config["auto_map"]["AutoModelForImageTextToText"] = "modeling_apt_llava.AptLlavaRenamed"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="points to modeling_apt_llava.AptLlavaRenamed, which modeling_apt_llava.py"):
        collect_upload_set(folder, tmp_path / "work2", repo_id=REPO)


# -- loading without apt_hf -----------------------------------------------------------------------------------------
REMOTE = textwrap.dedent("""
    import sys
    sys.modules["apt_hf"] = None  # apt_hf cannot be imported: only the repository's own code is available
    import json, os, re
    import torch
    import transformers
    from transformers.models.auto.image_processing_auto import AutoImageProcessor
    sys.modules["transformers"].AutoImageProcessor = AutoImageProcessor  # top-level one needs torchvision (absent)

    llava_dir, clip_dir, vit_dir, work = sys.argv[1:5]
    os.chdir(work)  # where the card's example.jpg is

    def card_snippet(folder, repo_id):
        text = open(os.path.join(folder, "README.md")).read()
        code = re.search(r"```python\\n(.*?)```", text, re.S).group(1)
        assert f'repo_id = "{repo_id}"' in code
        scope = {}
        exec(code.replace(f'repo_id = "{repo_id}"', f"repo_id = {folder!r}"), scope)
        return scope

    out, modules = {}, {}
    llava = card_snippet(llava_dir, "me/apt-tiny")  # AutoModelForImageTextToText + AutoProcessor, then generate
    with torch.no_grad():
        out["llava_logits"] = llava["model"](**llava["inputs"]).logits
    out["llava_inputs"] = dict(llava["inputs"])
    modules["llava"] = type(llava["model"]).__module__
    modules["llava_processor"] = type(llava["processor"]).__module__

    clip = card_snippet(clip_dir, "me/apt-clip")  # AutoModel + AutoImageProcessor
    out["clip_inputs"], out["clip_pooled"] = dict(clip["inputs"]), clip["embeddings"]
    modules["clip"] = type(clip["model"]).__module__
    modules["clip_processor"] = type(clip["processor"]).__module__

    vit = card_snippet(vit_dir, "me/apt-vit")  # AutoModelForImageClassification + AutoImageProcessor
    out["vit_logits"] = vit["outputs"].logits
    modules["vit"] = type(vit["model"]).__module__
    config = transformers.AutoConfig.from_pretrained(vit_dir, trust_remote_code=True)
    base = transformers.AutoModel.from_pretrained(vit_dir, trust_remote_code=True)
    modules["vit_base"] = type(base).__module__ + "." + type(base).__name__
    torch.save(out, os.path.join(work, "remote.pt"))
    print(json.dumps(modules))
""")


def test_dry_run_folders_load_with_remote_code_only(llava_dry_run, vision_dry_runs, llava, vision, tmp_path):
    photo = load_photos(("astronaut.png",))["astronaut"]
    photo.save(tmp_path / "example.jpg")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE, str(llava_dry_run), str(vision_dry_runs / "clip"), str(vision_dry_runs / "vit"),
         str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(m.startswith("transformers_modules.") for m in modules.values()), modules
    assert modules["vit_base"].endswith("AptViTModel")

    remote = torch.load(tmp_path / "remote.pt")
    _, model, _ = llava
    _, clip, vit, _ = vision
    with torch.no_grad():  # fp32 tolerance: floats differ in their last bits between processes' kernels and CPUs
        torch.testing.assert_close(model(**remote["llava_inputs"]).logits, remote["llava_logits"])
        torch.testing.assert_close(clip(**remote["clip_inputs"]).pooler_output, remote["clip_pooled"])
        torch.testing.assert_close(vit(**remote["clip_inputs"]).logits, remote["vit_logits"])


# -- the upload, up to the HTTP boundary ----------------------------------------------------------------------------
class FakeHub:
    """The Hub's endpoints that an upload touches, answered in-process; records every request."""

    def __init__(self, existing: list[str] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.commits: list[list[dict]] = []
        self.existing = existing or [".gitattributes"]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/api/repos/create":
            body = json.loads(request.content)
            return httpx.Response(200, json={"url": f"https://huggingface.co/{body['organization']}/{body['name']}"})
        if path.endswith("/branch/dev") or path == "/api/validate-yaml":
            return httpx.Response(200, json={})
        if "/tree/" in path:
            return httpx.Response(200, json=[{"type": "file", "path": p, "oid": "0" * 40, "size": 1}
                                             for p in self.existing])
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
        if "/commit/" in path:
            self.commits.append([json.loads(line) for line in request.content.decode().splitlines() if line])
            return httpx.Response(200, json={"commitUrl": f"https://huggingface.co/{REPO}/commit/{'a' * 40}",
                                             "commitOid": "a" * 40})
        return httpx.Response(404, headers={"X-Error-Code": "EntryNotFound"}, json={"error": "not found"})

    def committed(self, index: int = -1) -> dict[str, bytes]:
        return {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in self.commits[index] if line["key"] == "file"}

    def deleted(self, index: int = -1) -> set[str]:
        return {line["value"]["path"] for line in self.commits[index] if line["key"] == "deletedFile"}

    def find(self, method: str, suffix: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path.endswith(suffix)]


@pytest.fixture
def fake_hub(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # CI sets HF_HUB_OFFLINE=1; the mock is the network
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub = FakeHub(existing=[".gitattributes", "pytorch_model.bin", "model-00001-of-00002.safetensors", "README.md"])
    huggingface_hub.set_client_factory(
        lambda: httpx.Client(transport=httpx.MockTransport(hub), event_hooks={"request": [hf_request_event_hook]}))
    yield hub
    huggingface_hub.set_client_factory(default_client_factory)


def test_upload_sends_the_dry_run_set(fake_hub, llava, eval_file, llava_dry_run, capsys, caplog, tmp_path):
    path, _, _ = llava
    speed = tmp_path / "speed.json"
    speed.write_text(json.dumps(SPEED))
    with caplog.at_level(logging.DEBUG):
        rc = run_cli("--model_dir", path, "--repo_id", REPO, "--private", "--eval_results", eval_file,
                     "--revision", "dev", "--commit_message", "APT-LLaVA tiny", "--base_model",
                     "llava-hf/llava-1.5-7b-hf", "--datasets", "liuhaotian/LLaVA-Instruct-150K", "--speed_table", speed)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert TOKEN not in captured.out + captured.err + caplog.text  # the token is sent, never shown

    (create,) = fake_hub.find("POST", "/api/repos/create")
    assert json.loads(create.content) == {"name": "apt-tiny", "organization": "me", "type": "model",
                                          "visibility": "private"}
    assert fake_hub.find("POST", "/api/models/me/apt-tiny/branch/dev")
    assert fake_hub.find("POST", "/api/models/me/apt-tiny/preupload/dev")
    (commit,) = fake_hub.find("POST", "/api/models/me/apt-tiny/commit/dev")
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in fake_hub.requests if "/api/models/" in
               r.url.path or r.url.path == "/api/repos/create")
    header = fake_hub.commits[0][0]
    assert header["key"] == "header" and header["value"]["summary"] == "APT-LLaVA tiny"
    sent = fake_hub.committed()
    assert set(sent) == listing(llava_dry_run)  # exactly the dry-run folder, byte for byte
    for name, content in sent.items():
        assert content == (llava_dry_run / name).read_bytes(), name
    assert fake_hub.deleted() == {"pytorch_model.bin", "model-00001-of-00002.safetensors"}  # stale weights go
    assert "https://huggingface.co/me/apt-tiny" in captured.out


def test_python_push_to_hub_sends_the_same_remote_code(fake_hub, llava, llava_dry_run):
    """model.push_to_hub + processor.push_to_hub (transformers' own path) upload the same code and auto_map."""
    _, model, processor = llava
    model.push_to_hub(REPO)
    processor.push_to_hub(REPO)
    sent = {**fake_hub.committed(0), **fake_hub.committed(1)}
    assert {p for p in sent if p.endswith(".py")} == {p for p in listing(llava_dry_run) if p.endswith(".py")}
    for name in ("config.json", "processor_config.json"):
        assert json.loads(sent[name])["auto_map"] == json.loads((llava_dry_run / name).read_text())["auto_map"]
    assert not [p for p in sent if p.endswith(PICKLE_SUFFIXES)]


def test_python_push_to_hub_writes_the_script_card(fake_hub, vision, vision_dry_runs):
    """model.push_to_hub gives the card scripts/push_to_hub.py writes (not transformers' generic one), and says so
    when APT's layers were trained outside a Trainer run."""
    _, clip, _, _ = vision
    clip.push_to_hub("me/apt-clip", commit_message="python push")
    sent = fake_hub.committed()
    assert sent["README.md"] == (vision_dry_runs / "clip" / "README.md").read_bytes()
    assert "not fine-tuned" in sent["README.md"].decode()
    assert fake_hub.commits[-1][0]["value"]["summary"] == "python push"
    assert {p for p in sent if p.endswith(".py")} and "preprocessor_config.json" not in sent  # model files only

    trained = copy.deepcopy(clip)
    with torch.no_grad():
        next(trained.embeddings.zero_mlp.parameters()).add_(0.01)
    trained.push_to_hub("me/apt-clip")
    card = fake_hub.committed()["README.md"].decode()
    assert "zero-initialised layers hold trained" in card and "not fine-tuned" not in card


def test_public_upload_leaves_visibility_to_the_account(fake_hub, vision):
    root, *_ = vision
    result = publish(root / "clip", "me/apt-clip", commit_message="clip")
    body = json.loads(fake_hub.find("POST", "/api/repos/create")[0].content)
    assert body == {"name": "apt-clip", "organization": "me", "type": "model"}  # no visibility: account default
    assert not fake_hub.find("POST", "/branch/dev")
    assert fake_hub.find("POST", "/api/models/me/apt-clip/commit/main")
    assert set(fake_hub.committed()) == set(result.upload_set.paths)


def test_upload_refuses_without_token_or_offline(vision, monkeypatch, tmp_path):
    root, *_ = vision
    upload_set = collect_upload_set(root / "clip", tmp_path, repo_id="me/apt-clip")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        upload(upload_set)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("apt_hf.hub.get_token", lambda: None)
    with pytest.raises(LocalTokenNotFoundError, match="hf auth login"):
        upload(upload_set)


# -- conversion and sharding ----------------------------------------------------------------------------------------
def test_pickled_weights_are_converted(vision, tmp_path):
    root, clip, _, processor = vision
    folder = tmp_path / "pickled"
    clip.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(clip.state_dict(), folder / "pytorch_model.bin")
    result = publish(folder, "me/apt-clip", dry_run=True, local_dir=tmp_path / "out")
    files = listing(tmp_path / "out")
    assert "model.safetensors" in files and not [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in clip.state_dict().items())
    assert any("pickled" in note for note in result.upload_set.notes)
    assert ("pytorch_model.bin", "weights re-saved as safetensors (see notes)") in result.upload_set.skipped


def test_large_weights_are_sharded(llava, tmp_path):
    path, model, _ = llava
    result = publish(path, REPO, dry_run=True, local_dir=tmp_path / "out", max_shard_size="300KB")
    shards = sorted(p for p in listing(tmp_path / "out") if p.endswith(".safetensors"))
    assert len(shards) > 1 and all((tmp_path / "out" / s).stat().st_size <= 300_000 * 1.5 for s in shards)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    weights = {k: v for s in shards for k, v in load_file(tmp_path / "out" / s).items()}
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert ("model.safetensors", "weights re-saved as safetensors (see notes)") in result.upload_set.skipped


# -- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("repo_id", ["apt-tiny", "me/apt/tiny", "/apt-tiny", "me/", "me/apt tiny", "me/apt--x", 7])
def test_bad_repo_id(repo_id):
    with pytest.raises(ValueError, match="repo_id: expected 'namespace/name'"):
        validate_repo_id(repo_id)


BAD_RESULTS = {
    "a list": [LMMS_RESULTS],
    "no configs": {k: v for k, v in LMMS_RESULTS.items() if k != "configs"},
    "no config": {k: v for k, v in LMMS_RESULTS.items() if k != "config"},
    "results not a dict": {**LMMS_RESULTS, "results": [0.5]},
    "task not a dict": {**LMMS_RESULTS, "results": {"gqa": 0.61}},
    "metric key without filter": {**LMMS_RESULTS, "results": {"gqa": {"alias": "gqa", "exact_match": 0.61}}},
    "no numeric metric": {**LMMS_RESULTS, "results": {"gqa": {"alias": "gqa", "exact_match,none": "N/A"}}},
    "config without model": {**LMMS_RESULTS, "config": {"model_args": ""}},
    "throughput not a dict": {**LMMS_RESULTS, "throughput": [2.0]},
}


@pytest.mark.parametrize("case", sorted(BAD_RESULTS))
def test_bad_eval_results(case, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(BAD_RESULTS[case]))
    with pytest.raises(ValueError, match="eval_results"):
        parse_lmms_eval_results(path)


def test_eval_results_that_are_not_json(tmp_path, llava):
    samples = tmp_path / "samples_gqa.jsonl"
    samples.write_text('{"doc_id": 0}\n{"doc_id": 1}\n')
    with pytest.raises(ValueError, match=r"eval_results .*not JSON"):
        parse_lmms_eval_results(samples)
    with pytest.raises(ValueError, match="eval_results .*no such file"):
        parse_lmms_eval_results(tmp_path / "missing.json")
    path, _, _ = llava  # checked before the model folder is touched
    with pytest.raises(ValueError, match="eval_results"):
        publish(path, REPO, card=CardOptions(eval_results=samples), dry_run=True, local_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_model_dir_without_weights_or_processor(vision, tmp_path):
    root, clip, _, processor = vision
    no_weights = tmp_path / "no_weights"
    clip.save_pretrained(no_weights)
    processor.save_pretrained(no_weights)
    (no_weights / "model.safetensors").unlink()
    torch.save({}, no_weights / "training_args.bin")
    with pytest.raises(ValueError, match=r"model_dir: no weights in .*no_weights.*training_args\.bin"):
        publish(no_weights, "me/apt-clip", dry_run=True, local_dir=tmp_path / "out")
    (no_weights / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="model_dir: .*PEFT adapter"):
        publish(no_weights, "me/apt-clip", dry_run=True, local_dir=tmp_path / "out")

    no_processor = tmp_path / "no_processor"
    clip.save_pretrained(no_processor)
    with pytest.raises(ValueError, match=r"model_dir: no processor in .*no_processor"):
        publish(no_processor, "me/apt-clip", dry_run=True, local_dir=tmp_path / "out")
    from transformers import CLIPImageProcessorPil

    CLIPImageProcessorPil(**SIZES).save_pretrained(no_processor)  # a stock processor: wrong layout
    with pytest.raises(ValueError, match="not an APT one"):
        publish(no_processor, "me/apt-clip", dry_run=True, local_dir=tmp_path / "out")
    AptImageProcessorPil(**SIZES, patch_size=8, thresholds=[4.0]).save_pretrained(no_processor)
    with pytest.raises(ValueError, match=r"processor's thresholds \(\[4.0\]\) differs from the model config's"):
        publish(no_processor, "me/apt-clip", dry_run=True, local_dir=tmp_path / "out")
    with pytest.raises(ValueError, match="model_dir: expected a folder"):
        publish(tmp_path / "missing", "me/apt-clip", dry_run=True, local_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_llava_without_processor_or_stock_model(llava, tmp_path):
    path, model, _ = llava
    bare = tmp_path / "bare"
    model.save_pretrained(bare)
    with pytest.raises(ValueError, match=r"model_dir: no processor in .*bare"):
        collect_upload_set(bare, tmp_path / "work", repo_id=REPO)
    stock, processor = build_tiny_llava(vision=tiny_vision_config(image_size=112))
    stock.save_pretrained(tmp_path / "stock")
    processor.save_pretrained(tmp_path / "stock")
    with pytest.raises(ValueError, match=r"model_dir: .* holds a 'llava' model, not an APT one"):
        collect_upload_set(tmp_path / "stock", tmp_path / "work", repo_id=REPO)


def test_cli_reports_bad_input_without_traceback(llava, tmp_path, capsys):
    path, _, _ = llava
    assert run_cli("--model_dir", path, "--repo_id", "apt-tiny", "--dry_run", "--local_dir", tmp_path / "o") == 1
    assert "error: repo_id: expected 'namespace/name'" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert run_cli("--model_dir", path, "--repo_id", REPO, "--dry_run", "--local_dir", tmp_path / "full") == 1
    assert "error: local_dir: expected a new or empty folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli("--model_dir", path, "--repo_id", REPO, "--dry_run")
    assert "--dry_run needs --local_dir" in capsys.readouterr().err


def test_comparison_tables_read_results_with_the_card_parser(tmp_path):
    """`lmms_eval_plugin.comparison` (comparison tables) reads lmms-eval's JSON through the card's one parser."""
    from apt_hf.lmms_eval_plugin.comparison import compare_dirs
    from apt_hf.lmms_eval_plugin.results import load_run

    for name, speedup in (("stock", 1.0), ("apt", 1.5)):
        data = json.loads(json.dumps(LMMS_RESULTS))
        data["throughput"]["avg_gqa/images_per_second"] *= speedup
        data["throughput"]["avg_gqa/num_images"] = 100
        (tmp_path / name).mkdir()
        (tmp_path / name / "20260101_120000_results.json").write_text(json.dumps(data))
    run = load_run(tmp_path / "apt")
    assert run.model == "apt_llava" and run.model_args == "pretrained=/ckpt/apt-llava"
    assert run.scores == {"gqa": {"exact_match": 0.6121}, "pope": {"pope_accuracy": 0.8613, "pope_f1_score": 0.8532}}
    assert run.speed["gqa"].images_per_second == 2.1 * 1.5 and run.speed["gqa"].num_images == 100
    assert "gqa" in compare_dirs(tmp_path / "stock", tmp_path / "apt", ("stock", "APT"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x_results.json").write_text(json.dumps({"results": {}}))
    with pytest.raises(ValueError, match="results_dir"):
        load_run(tmp_path / "bad")


def test_finetune_push_to_hub_publishes_without_pickles_or_token(fake_hub, tmp_path):
    """`finetune_llava.py --push_to_hub --hub_token ...`: one commit of the safe upload set; the token on no file."""
    from apt_hf.tasks.llava import main, make_tiny_dataset

    stock = save_tiny_llava(tmp_path / "stock", vision=tiny_vision_config(image_size=56))
    data = make_tiny_dataset(tmp_path / "data.json", tmp_path / "images", num_samples=4, size=56)
    out = tmp_path / "run"
    secret = "hf_aTokenGivenOnTheCommandLine0123456789"
    main(["--model_name_or_path", str(stock), "--data_path", str(data), "--image_folder", str(tmp_path / "images"),
          "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", "2", "--save_steps", "1",
          "--report_to", "none", "--use_cpu", "true", "--push_to_hub", "--hub_model_id", REPO,
          "--hub_token", secret])
    os.environ.pop("HF_TOKEN", None)
    sent = fake_hub.committed()
    assert "model.safetensors" in sent and "README.md" in sent and "config.json" in sent
    assert not [p for p in sent if p.endswith(PICKLE_SUFFIXES) or p.startswith("checkpoint-")]
    assert all(r.headers["authorization"] == f"Bearer {secret}" for r in fake_hub.requests
               if r.url.path == "/api/repos/create")
    assert not [p for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_cards_state_the_base_model_what_the_weights_are_and_no_stderr_metric(vision, tmp_path):
    root, *_ = vision
    folder = tmp_path / "clip"
    shutil.copytree(root / "clip", folder)
    config = json.loads((folder / "config.json").read_text())
    config["base_model_name_or_path"] = "openai/clip-vit-large-patch14-336"  # what conversion from the hub records
    (folder / "config.json").write_text(json.dumps(config))
    results = json.loads(json.dumps(LMMS_RESULTS))
    results["results"]["gqa"]["exact_match_stderr_clt,none"] = 0.004  # lmms-eval 0.7.3 writes these too
    card = collect_upload_set(folder, tmp_path / "work", repo_id=REPO, card=CardOptions(eval_results=results)).card
    assert card.data.base_model == "openai/clip-vit-large-patch14-336"
    assert "converted from the stock weights and not fine-tuned" in card.text
    metrics = [m for r in card.data.eval_results for m in [r.metric_type, r.metric_name or ""]]
    assert metrics and not [m for m in metrics if "stderr" in m]
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 120, "epoch": 1.0, "log_history": []}))
    card = collect_upload_set(folder, tmp_path / "work2", repo_id=REPO).card
    assert "fine-tuned with APT for 120 steps (1 epochs)" in card.text


def test_cards_state_pyproject_transformers_floor():
    """The cards' "transformers >= X" is the floor CI tests (pyproject.toml), not a stale version."""
    from apt_hf.model_card import MIN_TRANSFORMERS

    script = Path(__file__).parents[1] / "scripts" / "supported_transformers.py"
    floor = subprocess.run([sys.executable, str(script), "floor"], capture_output=True, text=True, check=True)
    assert floor.stdout.strip().split(".")[:2] == MIN_TRANSFORMERS.split(".")
