"""Publish APT checkpoints on the Hugging Face Hub: collect and check a model folder's upload set, render its card,
then write it to a local folder (dry run) or upload it with huggingface_hub.

The upload set is a list of (path in the repository, source file). The dry run copies exactly that list into
`local_dir`; the upload commits exactly that list, so what a dry run shows is what the Hub gets. Checks made
before anything is written or sent:

- weights as safetensors only: pickled weights (`pytorch_model*.bin`) are converted by re-saving the model, a
  shard above `max_shard_size` is re-sharded the same way, and other pickles (`training_args.bin`, optimizer
  states, ...) are left out;
- the processor is there and is an APT one (a stock processor would feed the model the wrong layout);
- `auto_map` covers every Auto class a user calls (AutoConfig; AutoModel / AutoModelForImageClassification for
  vision; AutoModelForImageTextToText, AutoProcessor and AutoImageProcessor for LLaVA), each target class exists in
  the uploaded code, and the remote-code files include everything they import relatively;
- the processor and the model config agree on the APT fields.

The token comes from huggingface_hub's usual sources (HF_TOKEN, `hf auth login`) and is never read, printed or
logged here.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, get_token
from huggingface_hub.constants import is_offline_mode
from huggingface_hub.errors import (
    HFValidationError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id as hf_validate_repo_id
from transformers.dynamic_module_utils import get_relative_imports
from transformers.utils.hub import convert_file_size_to_int

from .configuration_apt import APT_FIELDS
from .families import family_of, is_composite, model_classes
from .model_card import CardOptions, LmmsEvalRun, render_model_card

logger = logging.getLogger(__name__)

MODEL_FILES = ("config.json", "generation_config.json")
SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_VOCABS = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
PROCESSOR_FILES = (
    PROCESSOR_FILE, IMAGE_PROCESSOR_FILE, TOKENIZER_CONFIG, *TOKENIZER_VOCABS, "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
CHAT_TEMPLATE_DIR = "additional_chat_templates"
CARD_FILE = "README.md"
DEFAULT_MAX_SHARD_SIZE = "5GB"

# One class per transformers backend, as AptImageProcessor.save_pretrained writes it.
IMAGE_PROCESSOR_TARGET = {"pil": "image_processing_apt.AptImageProcessorPil",
                          "torchvision": "image_processing_apt.AptImageProcessor"}
DEFAULT_COMMIT_MESSAGE = "Upload APT checkpoint (weights, processor, remote code, model card)"


@dataclass(frozen=True)
class UploadFile:
    """One file of the repository: where it goes, where it comes from, and why it is there."""

    path_in_repo: str
    source: Path
    role: str
    size: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", self.source.stat().st_size)  # kept after a dry run's work_dir is gone


@dataclass
class UploadSet:
    """Everything `push_to_hub.py` would publish for a model folder, plus what it left out and why."""

    model_dir: Path
    repo_id: str
    kind: str
    files: list[UploadFile]
    card: ModelCard
    auto_map: dict[str, str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [f.path_in_repo for f in self.files]

    def listing(self) -> str:
        """Human-readable summary: files with sizes and roles, Auto classes, skipped files, notes."""
        total = sum(f.size for f in self.files)
        width = max(len(p) for p in self.paths)
        lines = [f"upload set for {self.repo_id} ({self.kind}, {len(self.files)} files, {_human(total)}):"]
        lines += [f"  {f.path_in_repo:<{width}}  {_human(f.size):>9}  {f.role}" for f in self.files]
        lines.append("auto_map (trust_remote_code=True):")
        lines += [f"  {auto_class} -> {target}" for auto_class, target in self.auto_map.items()]
        if self.skipped:
            lines.append("left out:")
            lines += [f"  {path}: {why}" for path, why in self.skipped]
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {note}" for note in self.notes]
        return "\n".join(lines)


def _human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def validate_repo_id(repo_id: Any) -> str:
    """`namespace/name` or ValueError: a bare name would land in whichever account the token belongs to."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id: expected 'namespace/name' (e.g. 'my-user/apt-llava-1.5-7b'), got {repo_id!r}")
    try:
        hf_validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id: expected 'namespace/name' with letters, digits, '-', '_' or '.', got {repo_id!r} "
                         f"({err})") from None
    return repo_id


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"model_dir: {path.name} is not readable JSON ({what}): {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"model_dir: {path.name} ({what}) is not a JSON object")
    return data


# -- weights ------------------------------------------------------------------------------------------------------
def _safetensors_files(model_dir: Path) -> list[str]:
    """The checkpoint's safetensors files (single file or every shard of the index), or [] when it has none."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _read_json(index, "weights index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"model_dir: {SAFETENSORS_INDEX} in {model_dir} has no weight_map")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise ValueError(f"model_dir: {SAFETENSORS_INDEX} in {model_dir} lists shard(s) that are not there: "
                             f"{missing}")
        return shards
    return [SAFETENSORS_WEIGHTS] if (model_dir / SAFETENSORS_WEIGHTS).is_file() else []


def _has_pickle_weights(model_dir: Path) -> bool:
    return (model_dir / PICKLE_WEIGHTS).is_file() or (model_dir / PICKLE_INDEX).is_file()


def _resave_weights(model_dir: Path, config: dict[str, Any], work_dir: Path, max_shard_size: str | int) -> list[Path]:
    """Load the checkpoint with its APT class and save it again as safetensors shards of at most max_shard_size.

    Loading goes through the model class (not a raw tensor copy) so that tied and shared tensors are handled as
    transformers handles them; it needs the model in memory once, in its saved dtype.
    """
    model = _model_class(model_dir, config).from_pretrained(model_dir, dtype="auto")
    out = work_dir / "weights"
    model.save_pretrained(out, max_shard_size=max_shard_size)
    del model
    files = _safetensors_files(out)
    if not files:
        raise ValueError(f"model_dir: re-saving {model_dir} produced no safetensors weights")
    return [out / f for f in files] + ([out / SAFETENSORS_INDEX] if (out / SAFETENSORS_INDEX).is_file() else [])


# -- processor ----------------------------------------------------------------------------------------------------
def _image_processor_config(model_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The image processor's saved settings and the file holding them (nested in processor_config.json in v5)."""
    if (model_dir / IMAGE_PROCESSOR_FILE).is_file():
        return _read_json(model_dir / IMAGE_PROCESSOR_FILE, "image processor"), IMAGE_PROCESSOR_FILE
    if (model_dir / PROCESSOR_FILE).is_file():
        nested = _read_json(model_dir / PROCESSOR_FILE, "processor").get("image_processor")
        if isinstance(nested, dict):
            return nested, PROCESSOR_FILE
    return None, None


def _check_processor(model_dir: Path, cls: type, required: bool = True) -> dict[str, Any]:
    """Refuse a folder without an APT processor (unless not `required`); return the image processor settings."""
    image_processor, _ = _image_processor_config(model_dir)
    if image_processor is None and not required:
        return {}
    family, nested = family_of(cls), is_composite(cls.config_class)
    save_hint = family.processor_hint if nested else "AptImageProcessor(...).save_pretrained(model_dir)"
    if image_processor is None:
        raise ValueError(f"model_dir: no processor in {model_dir} (expected {IMAGE_PROCESSOR_FILE} or "
                         f"{PROCESSOR_FILE}); save it next to the model with {save_hint}")
    processor_type = str(image_processor.get("image_processor_type", ""))
    if not processor_type.startswith("Apt"):
        raise ValueError(f"model_dir: the image processor in {model_dir} is {processor_type or 'unknown'!r}, not an "
                         f"APT one, so it would not produce the packed layout the model expects; save {save_hint}")
    if nested:
        if not (model_dir / TOKENIZER_CONFIG).is_file() or not any((model_dir / f).is_file() for f in TOKENIZER_VOCABS):
            raise ValueError(f"model_dir: no tokenizer in {model_dir} (expected {TOKENIZER_CONFIG} and one of "
                             f"{list(TOKENIZER_VOCABS)}); save it with {save_hint}")
    apt_processor = _apt_processor(cls)
    if apt_processor is not None:
        processor = _read_json(model_dir / PROCESSOR_FILE, "processor") if (model_dir / PROCESSOR_FILE).is_file() \
            else {}
        tokenizer = _read_json(model_dir / TOKENIZER_CONFIG, "tokenizer")
        processor_class = processor.get("processor_class") or tokenizer.get("processor_class")
        if processor_class != apt_processor.__name__:
            raise ValueError(f"model_dir: the processor in {model_dir} is {processor_class!r}, not "
                             f"{apt_processor.__name__!r}; save {save_hint}")
    return image_processor


def _apt_settings(model_dir: Path, config: dict[str, Any], cls: type, image_processor: dict[str, Any],
                  processor: dict[str, Any]) -> dict[str, Any]:
    """The APT settings of the checkpoint, refusing a processor that disagrees with the model config."""
    vision = _vision_config(config, cls)
    if not isinstance(vision, dict):
        raise ValueError("model_dir: config.json has no vision_config")
    settings = {name: vision.get(name) for name in (*APT_FIELDS, "patch_size", "image_size")}
    for name in (*APT_FIELDS, "patch_size"):
        if name in image_processor and image_processor[name] != settings[name]:
            raise ValueError(f"model_dir: the processor's {name} ({image_processor[name]!r}) differs from the model "
                             f"config's ({settings[name]!r}); save both with the same APT settings")
    _check_reload(model_dir, settings, with_processor=bool(image_processor))
    if hasattr(cls.config_class, "vision_feature_layout"):
        settings["vision_feature_layout"] = config.get("vision_feature_layout", "packed")
        processor_layout = processor.get("vision_feature_layout", settings["vision_feature_layout"])
        if processor_layout != settings["vision_feature_layout"]:
            raise ValueError(f"model_dir: the processor's vision_feature_layout ({processor_layout!r}) differs from "
                             f"the model config's ({settings['vision_feature_layout']!r})")
    return settings


def _check_reload(model_dir: Path, saved: dict[str, Any], with_processor: bool = True) -> None:
    """Load the folder's config and image processor as a user will, and refuse APT fields that do not survive."""
    from transformers import AutoConfig
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    config = AutoConfig.from_pretrained(model_dir)
    loaded_objects = [("config", getattr(config, "vision_config", config))]
    if with_processor:
        loaded_objects.append(("image processor", AutoImageProcessor.from_pretrained(model_dir)))
    for name in APT_FIELDS:
        for where, loaded in ((where, getattr(obj, name)) for where, obj in loaded_objects):
            if saved[name] is not None and loaded != saved[name]:
                raise ValueError(f"model_dir: {name} is saved as {saved[name]!r} but the {where} reloads with "
                                 f"{loaded!r}; re-save the folder with this apt_hf version")


# -- auto_map and remote code -------------------------------------------------------------------------------------
def _ensure_auto_map(data: dict[str, Any], required: dict[str, Any], where: str, notes: list[str]) -> bool:
    """Add the missing Auto classes to a saved config's auto_map; True when something was added."""
    auto_map = data.setdefault("auto_map", {})
    added = {k: v for k, v in required.items() if k not in auto_map}
    auto_map.update(added)
    if added:
        notes.append(f"{where}: added auto_map entries {sorted(added)} (save_pretrained did not write them)")
    return bool(added)


def _defined_names(source: Path) -> set[str]:
    """Top-level classes and assigned names of a module, to check auto_map targets without importing it."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _code_files(model_dir: Path, modules: set[str], notes: list[str]) -> tuple[Path, list[str]]:
    """(folder to take the code from, file names): the auto_map modules and everything they import relatively.

    The folder's own copies are used when they are all there (the code the checkpoint was saved with); otherwise
    the whole set comes from the installed apt_hf, so that files of one version are never mixed with another's.
    """
    import apt_hf

    package_dir = Path(apt_hf.__file__).parent
    for source_dir in (model_dir, package_dir):
        needed, todo, complete = set(), sorted(modules), True
        while todo:
            name = f"{todo.pop()}.py"
            if name in needed:
                continue
            if not (source_dir / name).is_file():
                complete = False
                break
            needed.add(name)
            todo.extend(get_relative_imports(source_dir / name))
        if complete:
            if source_dir == package_dir:
                notes.append(f"remote code: {model_dir} lacks some of {sorted(needed)}; all of them are taken from "
                             f"the installed apt_hf {apt_hf.__version__}")
            return source_dir, sorted(needed)
    raise ValueError(f"model_dir: auto_map names module(s) {sorted(modules)} that neither {model_dir} nor apt_hf has")


def _shard_bytes(max_shard_size: str | int) -> int:
    try:
        size = convert_file_size_to_int(max_shard_size)
        if not isinstance(size, int) or size <= 0:
            raise ValueError
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"max_shard_size: expected a size like '5GB' or a number of bytes, got "
                         f"{max_shard_size!r}") from None
    return size


def _read_model_config(model_dir: Path) -> tuple[dict[str, Any], type]:
    """(config, APT model class) of an APT checkpoint folder; refuses anything else."""
    if not model_dir.is_dir():
        raise ValueError(f"model_dir: expected a folder written by save_pretrained, {model_dir} is not a folder")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model_dir: no config.json in {model_dir}; save the model there with save_pretrained")
    config = _read_json(model_dir / "config.json", "model config")
    return config, _model_class(model_dir, config)


def _model_class(model_dir: Path, config: dict[str, Any]) -> type:
    """The APT class a saved config names (`architectures`), or its model type's first class (apt_hf.families)."""
    model_type = config.get("model_type")
    classes = [c for c in model_classes() if c.config_class.model_type == model_type]
    if not classes:
        known = sorted({c.config_class.model_type for c in model_classes()})
        raise ValueError(f"model_dir: {model_dir} holds a {model_type!r} model, not an APT one ({known}); convert it "
                         "first (apt_hf.convert, scripts/convert_to_apt.py)")
    architecture = (config.get("architectures") or [None])[0]
    if architecture is None:
        return classes[0]
    for cls in classes:
        if cls.__name__ == architecture:
            return cls
    raise ValueError(f"model_dir: config.json architectures {config.get('architectures')!r} is not an APT class of "
                     f"model_type {model_type!r}; expected one of {[c.__name__ for c in classes]}")


def _vision_config(config: dict[str, Any], cls: type) -> Any:
    """Where a saved config holds its APT fields: itself, or its APT tower (composite models' `vision_config`, dense
    models' `backbone_config`)."""
    tower = getattr(cls.config_class, "tower_attribute", None)
    return config.get(tower) if tower else config


def _apt_processor(cls: type) -> type | None:
    """The family's own (APT) processor class, which the folder must hold; None where a stock one serves."""
    processor = family_of(cls).processor
    if processor is None or not is_composite(cls.config_class) or not processor.__name__.startswith("Apt"):
        return None
    return processor


def _model_auto_map(cls: type) -> dict[str, str]:
    """The auto_map a saved config of `cls` needs: its config class, and every Auto class the model serves."""
    module = cls.__module__.rpartition(".")[2]
    config_module = cls.config_class.__module__.rpartition(".")[2]
    return {"AutoConfig": f"{config_module}.{cls.config_class.__name__}",
            **{auto: f"{module}.{target}" for auto, target in cls.apt_auto_map.items()}}


def _inspect_weights(model_dir: Path, max_shard_bytes: int, max_shard_size: str | int) -> tuple[set[str], str | None]:
    """(the folder's safetensors files and index, why they must be re-saved or None); refuses a folder without."""
    shards = _safetensors_files(model_dir)
    if not shards and not _has_pickle_weights(model_dir):
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if (model_dir / "adapter_config.json").is_file():
            raise ValueError(f"model_dir: {model_dir} holds a PEFT adapter, not the model's weights; merge it "
                             "(merge_and_unload) and save_pretrained the merged model")
        found = f"; the pickle file(s) {pickles} are not a transformers checkpoint" if pickles else ""
        raise ValueError(f"model_dir: no weights in {model_dir} (expected {SAFETENSORS_WEIGHTS} or "
                         f"{SAFETENSORS_INDEX} and its shards){found}")
    names = set(shards) | ({SAFETENSORS_INDEX} if (model_dir / SAFETENSORS_INDEX).is_file() else set())
    if not shards:
        return names, "the weights are pickled (pytorch_model*.bin)"
    oversized = [s for s in shards if (model_dir / s).stat().st_size > max_shard_bytes]
    if oversized:
        return names, f"shard(s) {oversized} exceed max_shard_size {max_shard_size}"
    return names, None


def _complete_auto_maps(model_dir: Path, config: dict[str, Any], cls: type, notes: list[str],
                        with_processor: bool = True) -> tuple[dict[str, dict[str, Any]], set[str], dict[str, str]]:
    """The JSON files that carry auto_map, with missing Auto classes added: (contents, names of the files that
    changed, Auto class -> "target (file)")."""
    json_files: dict[str, dict[str, Any]] = {"config.json": config}
    for name in (PROCESSOR_FILE, IMAGE_PROCESSOR_FILE, TOKENIZER_CONFIG):
        if (model_dir / name).is_file():
            json_files[name] = _read_json(model_dir / name, "processor")
    wanted = [("config.json", config, _model_auto_map(cls))]
    apt_processor = _apt_processor(cls)
    if with_processor:
        if apt_processor is not None and PROCESSOR_FILE not in json_files:
            raise ValueError(f"model_dir: no {PROCESSOR_FILE} in {model_dir}; save the processor with "
                             f"{apt_processor.__name__}.save_pretrained(model_dir)")
        image_file = IMAGE_PROCESSOR_FILE if IMAGE_PROCESSOR_FILE in json_files else PROCESSOR_FILE
        image_config = json_files[image_file] if image_file == IMAGE_PROCESSOR_FILE \
            else json_files[PROCESSOR_FILE]["image_processor"]
        wanted.append((image_file, image_config, {"AutoImageProcessor": IMAGE_PROCESSOR_TARGET}))
    if with_processor and apt_processor is not None:
        target = f"{apt_processor.__module__.rpartition('.')[2]}.{apt_processor.__name__}"
        wanted.append((PROCESSOR_FILE, json_files[PROCESSOR_FILE], {"AutoProcessor": target}))
    changed, summary = set(), {}
    for name, data, required in wanted:
        if _ensure_auto_map(data, required, name, notes):
            changed.add(name)
        summary.update({k: f"{_target_text(data['auto_map'][k])} ({name})" for k in required})
    return json_files, changed, dict(sorted(summary.items()))


def _target_text(target: Any) -> str:
    """An auto_map target as one line: "module.Class", or "pil: module.A, torchvision: module.B"."""
    return ", ".join(f"{k}: {v}" for k, v in target.items()) if isinstance(target, dict) else str(target)


def _remote_code(model_dir: Path, json_files: dict[str, dict[str, Any]], notes: list[str]) -> tuple[Path, list[str]]:
    """The code files to upload, after checking that every auto_map target is defined in them."""
    targets = {}
    for name, data in json_files.items():
        maps = [data.get("auto_map") or {}]
        if isinstance(data.get("image_processor"), dict):
            maps.append(data["image_processor"].get("auto_map") or {})
        for entries in maps:
            for auto_class, target in entries.items():
                # A str, a [slow, fast] list, or {backend: target} (image processors, one class per backend).
                ones = target.values() if isinstance(target, dict) else target if isinstance(target, list) else [target]
                for one in ones:
                    if isinstance(one, str) and "--" not in one:  # "repo--module.Class" points to another repo
                        targets[one] = f"{name}: {auto_class}"
    code_dir, code_files = _code_files(model_dir, {t.split(".")[0] for t in targets}, notes)
    for target, where in sorted(targets.items()):
        module, _, class_name = target.rpartition(".")
        if class_name not in _defined_names(code_dir / f"{module}.py"):
            raise ValueError(f"model_dir: auto_map ({where}) points to {target}, which {module}.py does not define")
    return code_dir, code_files


# -- the upload set -----------------------------------------------------------------------------------------------
def collect_upload_set(
    model_dir: str | Path,
    work_dir: str | Path,
    *,
    repo_id: str,
    card: CardOptions | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    require_processor: bool = True,
) -> UploadSet:
    """Check `model_dir` and list what its repository holds; generated files (card, patched JSON, re-saved
    weights) are written to `work_dir`, which must outlive the returned UploadSet.

    `require_processor=False` accepts a model-only folder (as `model.push_to_hub` saves one); the processor is then
    pushed on its own, as transformers users do.

    Raises ValueError naming the argument for a folder without weights or processor, a repo id that is not
    `namespace/name`, eval results that are not lmms-eval's results JSON, and the other checks of this module.
    Every check runs before the weights are converted, which can take a while for a large model.
    """
    repo_id = validate_repo_id(repo_id)
    card_options = card or CardOptions()
    eval_run: LmmsEvalRun | None = card_options.eval_run()
    model_dir, work_dir = Path(model_dir), Path(work_dir)
    max_shard_bytes = _shard_bytes(max_shard_size)
    config, cls = _read_model_config(model_dir)
    weight_names, resave_reason = _inspect_weights(model_dir, max_shard_bytes, max_shard_size)
    image_processor = _check_processor(model_dir, cls, required=require_processor)
    processor = _read_json(model_dir / PROCESSOR_FILE, "processor") if (model_dir / PROCESSOR_FILE).is_file() else {}
    settings = _apt_settings(model_dir, config, cls, image_processor, processor)
    notes: list[str] = []
    if not image_processor:
        notes.append("no processor in the folder: push it too (processor.push_to_hub(repo_id)) so that "
                     "AutoProcessor / AutoImageProcessor load it")
    json_files, changed, auto_map = _complete_auto_maps(model_dir, config, cls, notes,
                                                        with_processor=bool(image_processor))
    code_dir, code_files = _remote_code(model_dir, json_files, notes)
    card_options = dataclasses.replace(
        card_options, base_model=card_options.base_model or _recorded_base_model(model_dir) or _hub_id(
            _vision_config(config, cls).get("base_model_name_or_path")))
    card = render_model_card(cls.card_kind, repo_id, settings, card_options, eval_run=eval_run,
                             training=_training_summary(model_dir))
    if eval_run is not None and eval_run.limit not in (None, 0):
        notes.append(f"eval_results: lmms-eval ran with --limit {eval_run.limit}; the card says so")
    if _apt_processor(cls) is not None and image_processor and not _has_chat_template(model_dir):
        notes.append("no chat template in the processor: users must write LLaVA prompts by hand")

    work_dir.mkdir(parents=True, exist_ok=True)
    card_path = work_dir / CARD_FILE
    card.save(card_path)
    files = [UploadFile(CARD_FILE, card_path, "model card")]
    for name in MODEL_FILES + PROCESSOR_FILES:
        if not (model_dir / name).is_file():
            continue
        role = "model config" if name in MODEL_FILES else "processor"
        if name in changed:
            out = work_dir / name
            out.write_text(json.dumps(json_files[name], indent=2, sort_keys=True) + "\n", encoding="utf-8")
            files.append(UploadFile(name, out, role + " (auto_map completed)"))
        else:
            files.append(UploadFile(name, model_dir / name, role))
    if (model_dir / CHAT_TEMPLATE_DIR).is_dir():
        files += [UploadFile(f"{CHAT_TEMPLATE_DIR}/{p.name}", p, "processor")
                  for p in sorted((model_dir / CHAT_TEMPLATE_DIR).glob("*.jinja"))]
    files += [UploadFile(name, code_dir / name, "remote code") for name in code_files]
    if resave_reason is None:
        files += [UploadFile(name, model_dir / name, "weights") for name in sorted(weight_names)]
    else:  # last: the slow step runs only once everything else has passed
        notes.append(f"weights: {resave_reason}; re-saved as safetensors shards of at most {max_shard_size}")
        files += [UploadFile(p.name, p, "weights (re-saved)")
                  for p in _resave_weights(model_dir, config, work_dir, max_shard_size)]
    files.sort(key=lambda f: (f.path_in_repo != CARD_FILE, f.path_in_repo))

    taken = {f.path_in_repo.split("/")[0] for f in files if f.path_in_repo != CARD_FILE}
    skipped = []
    for entry in sorted(model_dir.iterdir()):  # everything else stays out, with the reason
        if entry.name in taken:
            continue
        if resave_reason and (entry.name in weight_names or entry.name.startswith("pytorch_model")):
            why = "weights re-saved as safetensors (see notes)"
        else:
            why = _why_skipped(entry)
        skipped.append((entry.name + ("/" if entry.is_dir() else ""), why))
    return UploadSet(model_dir=model_dir, repo_id=repo_id, kind=cls.card_kind, files=files, card=card,
                     auto_map=auto_map, skipped=skipped, notes=notes)


def _has_chat_template(model_dir: Path) -> bool:
    if any((model_dir / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return True
    for name in (PROCESSOR_FILE, TOKENIZER_CONFIG):
        if (model_dir / name).is_file() and _read_json(model_dir / name, "processor").get("chat_template"):
            return True
    return (model_dir / CHAT_TEMPLATE_DIR).is_dir()


def _why_skipped(entry: Path) -> str:
    if entry.name == CARD_FILE:
        return "replaced by the rendered model card"
    if entry.is_dir():
        return "folder (checkpoints, logs, adapters and the like are not part of the model repository)"
    if entry.suffix in PICKLE_SUFFIXES:
        return "pickle: never uploaded (weights go as safetensors)"
    if entry.suffix == ".safetensors":
        return f"weights that neither {SAFETENSORS_WEIGHTS} nor {SAFETENSORS_INDEX} refer to (a stale shard?)"
    if entry.suffix == ".py":
        return "Python file that the checkpoint's code does not import"
    if entry.name.startswith("."):
        return "hidden file"
    return "not a model, processor or remote-code file"


def _hub_id(value: Any) -> str | None:
    """`value` when it names a hub repository (not a local folder), else None."""
    if not isinstance(value, str) or Path(value).expanduser().exists():
        return None
    try:
        return validate_repo_id(value)
    except ValueError:
        return None


def _training_summary(model_dir: Path) -> str:
    """What the card says the weights are: fine-tuned (trainer_state.json), APT layers trained (a non-zero
    zero-MLP in the weights, when no trainer state recorded the run) or converted only."""
    try:
        state = json.loads((model_dir / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = None
    if state is not None:
        steps, epochs = state.get("global_step"), state.get("epoch")
        return (f"fine-tuned with APT for {steps} steps" + (f" ({epochs:.3g} epochs)" if isinstance(epochs, float | int)
                                                             else "") + " (trainer_state.json).")
    trained = _apt_layers_trained(model_dir)
    if trained is None:
        return ("not recorded: the folder has no trainer_state.json and no safetensors weights to inspect, so "
                "whether APT's new layers were fine-tuned is unknown.")
    if trained:
        return ("fine-tuned: APT's zero-initialised layers hold trained (non-zero) weights; no trainer_state.json "
                "records how long.")
    return ("converted from the stock weights and not fine-tuned: APT's new layers are at their initial values "
            "(the zero-MLP outputs zero), so a merged patch is embedded from its resized pixels only. Fine-tune "
            "briefly (the paper heals in about one epoch) before relying on merged patches.")


def _apt_layers_trained(model_dir: Path) -> bool | None:
    """Whether any zero-MLP weight is non-zero (reads only those tensors); None without safetensors weights."""
    from safetensors import safe_open

    files = _safetensors_files(model_dir)
    if not files:
        return None
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if ".zero_mlp." in key and bool(weights.get_tensor(key).any()):
                    return True
    return False


def _recorded_base_model(model_dir: Path) -> str | None:
    """The hub id training recorded as its starting point (apt_training.json), if it looks like one."""
    info_file = model_dir / "apt_training.json"
    if not info_file.is_file():
        return None
    try:
        base = json.loads(info_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
        return validate_repo_id(base)
    except (ValueError, AttributeError):
        return None


# -- dry run and upload -------------------------------------------------------------------------------------------
def _check_local_dir(local_dir: str | Path, model_dir: str | Path) -> Path:
    """A dry run's folder must end up holding exactly the upload set: new or empty, and outside model_dir."""
    local_dir = Path(local_dir)
    if local_dir.exists() and (not local_dir.is_dir() or any(local_dir.iterdir())):
        raise ValueError(f"local_dir: expected a new or empty folder, so that it holds exactly the upload set; "
                         f"{local_dir} is not empty")
    if local_dir.resolve().is_relative_to(Path(model_dir).resolve()):
        raise ValueError(f"local_dir: must not be inside model_dir ({model_dir}), got {local_dir}")
    return local_dir


def write_upload_folder(upload_set: UploadSet, local_dir: str | Path) -> Path:
    """Copy exactly the upload set into `local_dir` (new or empty), as the repository will hold it."""
    local_dir = _check_local_dir(local_dir, upload_set.model_dir)
    for f in upload_set.files:
        target = local_dir / f.path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f.source, target)
    return local_dir


def upload(
    upload_set: UploadSet,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    api: HfApi | None = None,
) -> CommitInfo:
    """Create the repository (if needed) and the branch, and commit the upload set in one commit (or open a PR).

    Stale weight files of an earlier push (other shards, pickles) are deleted in the same commit, so the
    repository never mixes two checkpoints. `private` only applies when the repository is created.
    """
    if is_offline_mode():
        raise ValueError("HF_HUB_OFFLINE is set: unset it to upload, or use --dry_run --local_dir DIR")
    api = api or HfApi()
    if api.token is None and get_token() is None:
        raise LocalTokenNotFoundError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (write access to "
                                      f"{upload_set.repo_id.split('/')[0]!r})")
    repo_id = upload_set.repo_id
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    operations: list[Any] = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.source))
                             for f in upload_set.files]
    operations += [CommitOperationDelete(path_in_repo=path) for path in _stale_weights(api, upload_set, revision)]
    return api.create_commit(repo_id, operations, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                             commit_description=commit_description, revision=revision, create_pr=create_pr,
                             repo_type="model")


def _stale_weights(api: HfApi, upload_set: UploadSet, revision: str | None) -> list[str]:
    """Weight files already in the repository that the new upload set does not replace."""
    try:
        existing = api.list_repo_files(upload_set.repo_id, revision=revision, repo_type="model")
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return []
    new = set(upload_set.paths)

    def is_weight(path: str) -> bool:
        name = path.rsplit("/", 1)[-1]
        return "/" not in path and (name.endswith(".safetensors") or name == SAFETENSORS_INDEX
                                    or name.endswith(PICKLE_SUFFIXES) or name == PICKLE_INDEX)

    return sorted(p for p in existing if is_weight(p) and p not in new)


@dataclass
class PublishResult:
    """What `publish` did: the upload set, and the folder (dry run) or the commit (upload)."""

    upload_set: UploadSet
    local_dir: Path | None = None
    commit: CommitInfo | None = None


def publish(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    card: CardOptions | None = None,
    dry_run: bool = False,
    local_dir: str | Path | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    api: HfApi | None = None,
) -> PublishResult:
    """Check `model_dir`, then write its upload set to `local_dir` (dry_run) or upload it to `repo_id`."""
    if dry_run and local_dir is None:
        raise ValueError("local_dir: a dry run writes the folder it would upload; give local_dir")
    if local_dir is not None and not dry_run:
        raise ValueError("local_dir: only used with dry_run (the upload itself writes nothing locally)")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ValueError(f"revision: expected a branch name, got {revision!r}")
    if dry_run:
        _check_local_dir(local_dir, model_dir)  # before any (possibly long) conversion
    with tempfile.TemporaryDirectory(prefix="apt_hf_upload_") as work_dir:
        upload_set = collect_upload_set(
            model_dir, work_dir, repo_id=repo_id, card=card, max_shard_size=max_shard_size)
        if dry_run:
            return PublishResult(upload_set, local_dir=write_upload_folder(upload_set, local_dir))
        commit = upload(upload_set, private=private, revision=revision, commit_message=commit_message, api=api)
        logger.info("uploaded %d files to %s", len(upload_set.files), commit.commit_url)
        return PublishResult(upload_set, commit=commit)


def push_model_to_hub(
    model: Any,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    tags: list[str] | None = None,
    card: CardOptions | None = None,
) -> CommitInfo:
    """`model.push_to_hub(...)` for APT models: transformers' arguments, the model card `scripts/push_to_hub.py`
    writes (APT settings, usage, what the weights are), and the same checks. The processor is pushed on its own."""
    if tags:
        logger.info("push_to_hub: tags %s are not added; the card carries APT's own tags", tags)
    api = HfApi(token=token) if isinstance(token, str) else HfApi()
    with tempfile.TemporaryDirectory(prefix="apt_hf_push_") as save_dir, \
            tempfile.TemporaryDirectory(prefix="apt_hf_upload_") as work_dir:
        model.save_pretrained(save_dir, max_shard_size=max_shard_size)
        upload_set = collect_upload_set(save_dir, work_dir, repo_id=repo_id, card=card, max_shard_size=max_shard_size,
                                        require_processor=False)
        return upload(upload_set, private=private, revision=revision, commit_message=commit_message,
                      commit_description=commit_description, create_pr=create_pr, api=api)


__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "PublishResult",
    "UploadFile",
    "UploadSet",
    "collect_upload_set",
    "publish",
    "push_model_to_hub",
    "upload",
    "validate_repo_id",
    "write_upload_folder",
]
