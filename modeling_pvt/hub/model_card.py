"""The one model-card renderer: Hub metadata and markdown from a Jinja template and a results mapping.

Two templates in `card_templates/`, one rendering path:

- `render_paper_size_card(size, ...)`: the card of one of the paper's four ImageNet-1k classifiers, every number
  computed by `modeling_pvt.hub.model_facts` or labelled as the paper's (`scripts/make_model_cards.py` writes them to
  `model_cards/`, `scripts/push_to_hub.py` publishes them);
- `render_trained_card(...)`: the card a training script writes next to the model it trained (classification,
  segmentation, or any other `results.Task`): what was trained, its measured scores, its settings and command.

Both put measured scores in the `model-index` metadata only from a results mapping of the schema in
`modeling_pvt.hub.results`; nothing else produces a number there.
"""

import functools
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..configuration_pvt import PVT_PRESETS, PvtConfig
from .model_facts import (
    PAPER_REPORTED,
    attention_multiply_adds,
    build_on_meta,
    feature_maps,
    format_giga,
    format_millions,
    model_facts,
    multiply_adds_by_operator,
)
from .results import IMAGE_CLASSIFICATION, Task, check_results

TEMPLATES_DIR = Path(__file__).resolve().parent / "card_templates"
DEFAULT_NAMESPACE = "org"  # placeholder organisation of the committed cards; publishing passes the real repo id
PAPER_SIZE_TAGS = ["image-classification", "vision", "pvt", "pyramid-vision-transformer", "backbone"]
# Stochastic-depth rate of the training recipe, per size (the original code's settings).
DROP_PATH_RATES = {"tiny": 0.1, "small": 0.1, "medium": 0.3, "large": 0.3}
COST_GROWTH_INPUTS = (224, 448, 640, 800, 1024)
BACKBONE_EXAMPLE_SIZE = (384, 640)  # non-square on purpose: any input size works


def default_repo_id(size: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    return f"{namespace}/pvt-{size}"


def measured_scores(results: Mapping, task: Task, source: str) -> tuple[dict, list[EvalResult]]:
    """The card's "measured" section (table rows, dataset text) and `model-index` entries of a results mapping."""
    check_results(results, task)
    dataset, config_name, split = results["dataset_name"], results.get("dataset_config_name"), results["split"]
    metrics = [metric for metric in task.metrics if results.get(metric.key) is not None]
    eval_results = [
        EvalResult(
            task_type=task.pipeline_tag,
            task_name=task.name,
            dataset_type=str(dataset),
            dataset_name=str(dataset),
            dataset_config=config_name or None,
            dataset_split=split,
            metric_type=metric.type,
            metric_name=metric.name,
            metric_value=float(results[metric.key]),
        )
        for metric in metrics
    ]
    rows = [{"name": metric.name, "value": f"{100 * results[metric.key]:.2f}%"} for metric in metrics]
    rows.append({"name": "Images evaluated", "value": f"{int(results['eval_samples']):,}"})
    dataset_text = f"`{dataset}`" + (f" (`{config_name}`)" if config_name else "") + f", split `{split}`"
    return {"rows": rows, "dataset_text": dataset_text, "source": source}, eval_results


def _render(template: str, card_data: ModelCardData, **variables) -> str:
    return str(ModelCard.from_template(card_data, template_path=str(TEMPLATES_DIR / template), **variables))


@functools.cache
def _computed_facts(size: str) -> dict:
    """Everything the card of `size` computes from the code (cached: the counts trace a whole forward pass)."""
    config = PvtConfig.from_preset(size)
    model = build_on_meta(config)
    cost_growth, base = [], None
    for side in COST_GROWTH_INPUTS:
        by_operator = multiply_adds_by_operator(model, side)
        total = sum(by_operator.values())
        base = base or total
        cost_growth.append(
            {
                "input": f"{side}×{side}",
                "macs": format_giga(total),
                "ratio": f"{total / base:.1f}×",
                "attention_share": f"{attention_multiply_adds(by_operator) / total:.0%}",
            }
        )
    return {"config": config, "facts": model_facts(config), "cost_growth": cost_growth}


def render_paper_size_card(size: str, results: Mapping | None = None, repo_id: str | None = None) -> str:
    """The model card of the paper's PVT-`size` ImageNet-1k classifier published as `repo_id`.

    Only with `results` (the schema of `modeling_pvt.hub.results`) does it carry `model-index` metadata and a
    "measured" section; a results mapping that lacks what those need is refused with `ValueError`.
    """
    if size not in PVT_PRESETS:
        raise ValueError(f"Unknown PVT size {size!r}; choose one of {list(PVT_PRESETS)}.")
    repo_id = repo_id or default_repo_id(size)
    computed = _computed_facts(size)
    config, facts = computed["config"], computed["facts"]
    measured, eval_results = None, None
    if results is not None:
        source = results.get("source") or "`scripts/eval_classification.py` / training script results"
        measured, eval_results = measured_scores(results, IMAGE_CLASSIFICATION, source)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=IMAGE_CLASSIFICATION.pipeline_tag,
        license="apache-2.0",
        tags=PAPER_SIZE_TAGS,
        datasets=["imagenet-1k"],
        metrics=["accuracy"] if eval_results else None,
        model_name=repo_id.split("/")[-1] if eval_results else None,
        eval_results=eval_results,
    )
    height, width = facts.image_size
    backbone_height, backbone_width = BACKBONE_EXAMPLE_SIZE
    return _render(
        "paper_size.jinja",
        card_data,
        size=size,
        size_title=size.capitalize(),
        repo_id=repo_id,
        parameters_exact=f"{facts.num_parameters:,}",
        parameters_short=format_millions(facts.num_parameters),
        macs_exact=f"{facts.multiply_adds:,}",
        macs_short=format_giga(facts.multiply_adds),
        image_size_text=f"{height}×{width}",
        depths=config.depths,
        hidden_sizes=config.hidden_sizes,
        num_heads=config.num_attention_heads,
        mlp_ratios=config.mlp_ratios,
        reduction_ratios=config.sequence_reduction_ratios,
        feature_maps=facts.feature_maps,
        backbone_example={
            "height": backbone_height,
            "width": backbone_width,
            "feature_maps": feature_maps(config, BACKBONE_EXAMPLE_SIZE),
        },
        paper_top1=f"{PAPER_REPORTED[size].imagenet_top1:.1f}",
        results=measured,
        cost_growth=computed["cost_growth"],
        drop_path_rate=DROP_PATH_RATES[size],
    )


def render_trained_card(
    *,
    repo_id: str,
    task: Task,
    title: str,
    summary: str,
    results: Mapping | None = None,
    source: str = "the training script",
    run_summary: str | None = None,
    settings: Mapping[str, object] | None = None,
    command: str | None = None,
    base_model: str | None = None,
    tags: tuple[str, ...] = (),
) -> str:
    """The card of a model trained with this package: `results` (the schema of `modeling_pvt.hub.results`) measured by
    `source`, the training `settings` as a table and the `command` that ran. Works for any `Task`."""
    measured, eval_results = None, None
    if results is not None:
        measured, eval_results = measured_scores(results, task, source)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=task.pipeline_tag,
        license="apache-2.0",
        tags=["pvt", task.pipeline_tag, "vision", *tags],
        base_model=base_model,
        metrics=sorted({metric.type for metric in task.metrics}) if eval_results else None,
        model_name=repo_id.split("/")[-1] if eval_results else None,
        eval_results=eval_results,
    )
    return _render(
        "trained.jinja",
        card_data,
        title=title,
        summary=summary,
        results=measured,
        run_summary=run_summary,
        auto_class=task.auto_class,
        pipeline_tag=task.pipeline_tag,
        repo_id=repo_id,
        settings=dict(settings or {}),
        command=command,
    )


__all__ = [
    "DEFAULT_NAMESPACE",
    "default_repo_id",
    "measured_scores",
    "render_paper_size_card",
    "render_trained_card",
]
