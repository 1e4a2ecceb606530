"""Model cards for APT checkpoints, rendered with huggingface_hub's ModelCard from the package's templates
(apt_hf/model_cards/*.md, shipped as package data, so an installed wheel renders the same cards as a checkout).

Metadata (library, pipeline tag, base model, data sets, license, tags, model-index) lives in `ModelCardData`, so
the Hub, `ModelCard.load` and leaderboards read it; the templates only hold the prose, the usage snippet and
the tables. Evaluation results come from lmms-eval's results JSON, checked against its schema by the plugin's one
parser (`apt_hf.lmms_eval_plugin.results.parse_lmms_eval_results`, re-exported here) because a hand-written or
truncated file would publish numbers nobody can trace; the throughput columns are the metrics the plugin names in
`apt_hf.lmms_eval_plugin.metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .families import CARD_KINDS
from .lmms_eval_plugin.metrics import (
    ALL_TASKS,
    CARD_COLUMNS,
    KEPT_TOKEN_RATIO,
    VISUAL_TOKENS_PER_IMAGE,
    logged_name,
    logged_tasks,
)
from .lmms_eval_plugin.results import LmmsEvalRun, LmmsEvalScore, parse_lmms_eval_results

PAPER_TITLE = "Accelerating Vision Transformers with Adaptive Patch Sizes"
PAPER_AUTHORS = "Rohan Choudhury, JungEun Kim, Jinhyung Park, Eunho Yang, László A. Jeni, Kris M. Kitani"
PAPER_URL = "https://arxiv.org/abs/2510.18091"
CITATION = """@inproceedings{choudhury2026apt,
  title     = {Accelerating Vision Transformers with Adaptive Patch Sizes},
  author    = {Choudhury, Rohan and Kim, JungEun and Park, Jinhyung and Yang, Eunho and Jeni, L{\\'a}szl{\\'o} A. and
               Kitani, Kris M.},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2026},
  eprint    = {2510.18091},
  archivePrefix = {arXiv}
}"""
LMMS_EVAL_URL = "https://github.com/EvolvingLMMs-Lab/lmms-eval"

# The templates: package data (apt_hf/model_cards/), read through importlib.resources so that they are found in
# an editable checkout, an installed wheel or a zipped install alike.
TEMPLATE_DIR = resources.files(__package__) / "model_cards"


BASE_TAGS = ("apt", "adaptive-patch-transformers", "vision-transformer")
# The oldest transformers the published remote code runs on: pyproject's floor (a test keeps the two equal).
MIN_TRANSFORMERS = "5.23"


def throughput_rows(run: LmmsEvalRun) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of tokens kept and images/s as `apt_llava` logged them during the evaluation: one row for
    all tasks, then one per task; ([], []) when the run has none (another lmms-eval model, older lmms-eval)."""
    stats = run.throughput
    rows = []
    for label, task in [(ALL_TASKS, None), *((task, task) for task in logged_tasks(stats))]:
        if stats.get(logged_name(VISUAL_TOKENS_PER_IMAGE, task)) is None:
            continue
        cells = [label]
        for key, _ in CARD_COLUMNS:
            value = stats.get(logged_name(key, task))
            cells.append("" if value is None else f"{100 * value:.1f}%" if key == KEPT_TOKEN_RATIO
                         else _format(float(value)))
        rows.append(cells)
    if not rows:
        return [], []
    return ["tasks", *(column for _, column in CARD_COLUMNS)], rows


def eval_results_for_card(run: LmmsEvalRun, task_type: str) -> list[EvalResult]:
    """model-index entries (huggingface_hub's EvalResult) for every score, credited to lmms-eval."""
    results = []
    for score in run.scores:
        results.append(EvalResult(
            task_type=task_type,
            dataset_type=score.dataset_path or score.task,
            dataset_name=score.task,
            dataset_config=score.dataset_config,
            dataset_split=score.split,
            metric_type=score.metric,
            metric_name=score.metric if score.filter == "none" else f"{score.metric} ({score.filter})",
            metric_value=score.value,
            source_name="lmms-eval",
            source_url=LMMS_EVAL_URL,
        ))
    return results


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def speed_table_rows(table: Any) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of a tokens-kept / speed table given as rows of {column: value} (e.g. benchmark output)."""
    if isinstance(table, Mapping) and "rows" in table:
        table = table["rows"]
    if not isinstance(table, Sequence) or isinstance(table, (str, bytes)) or not table:
        raise ValueError(f"speed_table: expected a non-empty list of rows {{column: value}}, got {table!r:.200}")
    headers: list[str] = []
    for i, row in enumerate(table):
        if not isinstance(row, Mapping) or not row:
            raise ValueError(f"speed_table: expected each row to be a non-empty {{column: value}} object, row {i} is "
                             f"{row!r:.200}")
        for key, value in row.items():
            if not isinstance(value, (str, int, float, bool, type(None), list, tuple)):
                raise ValueError(f"speed_table: expected scalar cells, row {i} column {key!r} is {value!r:.200}")
            if str(key) not in headers:
                headers.append(str(key))
    rows = [[_format(row[h]) if row.get(h) is not None else "" for h in headers] for row in table]
    return [_format(h) for h in headers], rows


def apt_settings_rows(settings: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The APT settings table: patch sizes per scale, thresholds, scorer, and the LLaVA layout when there is one."""
    patch, scales = int(settings["patch_size"]), int(settings["num_scales"])
    sizes = ", ".join(f"{patch * 2 ** s}" for s in range(scales))
    scorer = settings["scorer"]
    rows = [
        ("base patch size", f"{patch} px"),
        ("scales (`num_scales`)", f"{scales}: patches of {sizes} px"),
        ("thresholds (`thresholds`)", _format(list(settings["thresholds"])) or "none (nothing merged)"),
        ("scorer (`scorer`)", f"{scorer}" + (f", {settings['entropy_bins']} bins (`entropy_bins`)"
                                             if scorer == "entropy" else "")),
    ]
    if settings.get("image_size"):
        rows.append(("input size", f"{settings['image_size']} px"))
    if settings.get("vision_feature_layout"):
        layout = settings["vision_feature_layout"]
        what = ("only the kept tokens reach the language model" if layout == "packed"
                else "tokens repeated over the full grid: stock LLaVA's token count")
        rows.append(("`vision_feature_layout`", f"{layout} ({what})"))
    return rows


@dataclass
class CardOptions:
    """What a model card states beyond the checkpoint itself; every field is optional.

    base_model: hub id APT was converted from; datasets: hub ids of the fine-tuning data; license: the card's
    license (default: the base model family's); eval_results: lmms-eval's results JSON (path or dict);
    speed_table: rows {"column": value} for the speed table.
    """

    base_model: str | None = None
    datasets: Sequence[str] | None = None
    license: str | None = None
    eval_results: str | Path | Mapping[str, Any] | None = None
    speed_table: Any = None

    def eval_run(self) -> LmmsEvalRun | None:
        return parse_lmms_eval_results(self.eval_results) if self.eval_results is not None else None


def render_model_card(
    kind: str,
    repo_id: str,
    settings: Mapping[str, Any],
    options: CardOptions | None = None,
    *,
    eval_run: LmmsEvalRun | None = None,
    training: str | None = None,
    template_path: str | Path | None = None,
) -> ModelCard:
    """The README.md of an APT checkpoint: metadata in ModelCardData, prose and tables from the kind's template.

    kind: "llava", "clip" (vision tower), "clip_full" (with the text tower), "vit" or "vit_classifier";
    settings: the APT fields (num_scales, thresholds, scorer, entropy_bins), patch_size, image_size and, for LLaVA,
    vision_feature_layout. `eval_run`: the parsed
    `options.eval_results`, when the caller has parsed them already. `training`: what the weights are (converted
    only, or fine-tuned and how long), stated on the card.
    """
    options = options or CardOptions()
    eval_run = eval_run if eval_run is not None else options.eval_run()
    base_model, datasets, license, speed_table = (options.base_model, options.datasets, options.license,
                                                  options.speed_table)
    if kind not in CARD_KINDS:
        raise ValueError(f"kind: expected one of {sorted(CARD_KINDS)}, got {kind!r}")
    spec = CARD_KINDS[kind]
    if template_path is not None:
        template = Path(template_path)
        if not template.is_file():
            raise ValueError(f"template_path: model card template {template} not found")
    else:
        template = TEMPLATE_DIR / spec.template
        if not template.is_file():
            raise ValueError(f"kind: the model card template {spec.template} is missing from the installed apt_hf "
                             f"({TEMPLATE_DIR}): its package data was not installed; reinstall apt_hf")
    name = repo_id.split("/")[-1]
    card_data = ModelCardData(
        model_name=name if eval_run else None,  # only model-index needs it
        library_name="transformers",
        pipeline_tag=spec.pipeline_tag,
        base_model=base_model or None,
        datasets=list(datasets) if datasets else None,
        license=license or spec.default_license,
        tags=[*BASE_TAGS, *spec.tags],
        eval_results=eval_results_for_card(eval_run, spec.pipeline_tag) if eval_run else None,
    )
    speed_headers, speed_rows = speed_table_rows(speed_table) if speed_table is not None else ([], [])
    throughput = throughput_rows(eval_run) if eval_run else ([], [])
    eval_rows = []
    if eval_run:
        for s in eval_run.scores:
            metric = s.metric if s.filter == "none" else f"{s.metric} ({s.filter})"
            eval_rows.append([s.task, metric, _format(s.value), "" if s.stderr is None else _format(s.stderr)])
    return ModelCard.from_template(
        card_data,
        template_str=template.read_text(encoding="utf-8"),
        title=f"{spec.title}: {name}",
        repo_id=repo_id,
        settings_rows=apt_settings_rows(settings),
        speed_headers=speed_headers,
        speed_rows=speed_rows,
        eval_rows=eval_rows,
        eval_model_args=eval_run.model_args if eval_run else None,
        eval_limit=eval_run.limit if eval_run else None,
        eval_tasks=",".join(dict.fromkeys(s.task for s in eval_run.scores)) if eval_run else None,
        throughput_headers=throughput[0],
        throughput_rows=throughput[1],
        classifier=spec.pipeline_tag == "image-classification",
        zero_shot=spec.pipeline_tag == "zero-shot-image-classification",
        family_name=spec.title.removeprefix("APT-"),
        stock_class=spec.stock_class,
        has_class_token=spec.has_class_token,
        min_transformers=MIN_TRANSFORMERS,
        training=training,
        paper_title=PAPER_TITLE,
        paper_authors=PAPER_AUTHORS,
        paper_url=PAPER_URL,
        citation=CITATION,
        lmms_eval_url=LMMS_EVAL_URL,
    )


__all__ = [
    "CARD_KINDS",
    "CITATION",
    "MIN_TRANSFORMERS",
    "CardOptions",
    "LmmsEvalRun",
    "LmmsEvalScore",
    "apt_settings_rows",
    "eval_results_for_card",
    "parse_lmms_eval_results",
    "render_model_card",
    "speed_table_rows",
    "throughput_rows",
]
