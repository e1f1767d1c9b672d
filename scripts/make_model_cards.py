#!/usr/bin/env python
"""Generate the model cards `model_cards/pvt-{tiny,small,medium,large}.md` from one template.

    python scripts/make_model_cards.py                     # (re)write the four cards
    python scripts/make_model_cards.py --check             # exit 1 if a committed card is stale
    python scripts/make_model_cards.py --results tiny=eval/pvt-tiny.json --namespace my-org --output_dir out

Every number in a card comes from `modeling_pvt.model_facts` (parameters, multiply-adds, feature maps, cost growth)
or is the paper's ImageNet-1k top-1, labelled as reported by the paper. The `model-index` metadata is written only
from a results JSON (`--results size=path.json`) measured by `scripts/evaluate.py` or the trainer, never otherwise.

A results JSON holds fractions in [0, 1]:
    {"eval_accuracy": 0.751, "eval_top5_accuracy": 0.927,              # top-1 required, top-5 optional
     "dataset_name": "imagenet-1k", "dataset_config_name": null,          # Hub dataset id, required (or "dataset")
     "split": "validation", "eval_samples": 50000, "source": "scripts/evaluate.py"}   # optional
`render_model_card(size, results=None, repo_id=None)` is the API the Hub push script uses.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from modeling_pvt import PVT_PRESETS, PvtConfig
from modeling_pvt.model_facts import (
    PAPER_REPORTED,
    attention_multiply_adds,
    build_on_meta,
    feature_maps,
    format_giga,
    format_millions,
    model_facts,
    multiply_adds_by_operator,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CARDS_DIR = REPO_ROOT / "model_cards"
TEMPLATE_PATH = CARDS_DIR / "card_template.jinja"
DEFAULT_NAMESPACE = "org"  # the placeholder organisation; the push script passes the real repo id
SIZES = list(PVT_PRESETS)
# Stochastic-depth rate of the training recipe, per size (the original code's settings).
DROP_PATH_RATES = {"tiny": 0.1, "small": 0.1, "medium": 0.3, "large": 0.3}
COST_GROWTH_INPUTS = (224, 448, 640, 800, 1024)
BACKBONE_EXAMPLE_SIZE = (384, 640)  # non-square on purpose: any input size works
TAGS = ["image-classification", "vision", "pvt", "pyramid-vision-transformer", "backbone"]
REQUIRED_RESULT_KEYS = ("eval_accuracy", "dataset_name")


def card_path(size: str, output_dir: Path = CARDS_DIR) -> Path:
    return Path(output_dir) / f"pvt-{size}.md"


def default_repo_id(size: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    return f"{namespace}/pvt-{size}"


def _fraction(results: Mapping, key: str) -> float:
    value = results[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"Results entry {key!r} must be a fraction in [0, 1] (as evaluate's accuracy), got {value!r}."
        )
    return float(value)


def _measured_results(results: Mapping, model_name: str) -> tuple[dict, list[EvalResult]]:
    """Template variables and `model-index` entries for a results JSON; refuses one that lacks what it needs."""
    # scripts/train.py writes the dataset as "dataset", scripts/evaluate.py as "dataset_name".
    results = {**results, "dataset_name": results.get("dataset_name") or results.get("dataset")}
    missing = [key for key in REQUIRED_RESULT_KEYS if results.get(key) in (None, "")]
    if missing:
        raise ValueError(
            f"The results JSON lacks {', '.join(map(repr, missing))}; it needs at least {list(REQUIRED_RESULT_KEYS)} "
            "(the dataset may also be given as 'dataset')."
        )
    dataset = str(results["dataset_name"])
    config_name = results.get("dataset_config_name") or None
    split = results.get("split") or None
    metrics = [("accuracy", "Top-1 accuracy", _fraction(results, "eval_accuracy"))]
    if results.get("eval_top5_accuracy") is not None:
        metrics.append(("top_5_accuracy", "Top-5 accuracy", _fraction(results, "eval_top5_accuracy")))
    eval_results = [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_config=config_name,
            dataset_split=split,
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=value,
        )
        for metric_type, metric_name, value in metrics
    ]
    rows = [{"name": name, "value": f"{100 * value:.2f}%"} for _, name, value in metrics]
    if results.get("eval_samples") is not None:
        rows.append({"name": "Images evaluated", "value": f"{int(results['eval_samples']):,}"})
    dataset_text = (
        f"`{dataset}`" + (f" (`{config_name}`)" if config_name else "") + (f", split `{split}`" if split else "")
    )
    source = results.get("source") or "`scripts/evaluate.py` / trainer results"
    return {"rows": rows, "dataset_text": dataset_text, "source": source}, eval_results


@functools.cache
def _computed_facts(size: str) -> dict:
    """Everything the card of `size` computes from the code (cached: the counts trace a whole forward pass)."""
    config = PvtConfig.from_preset(size)
    model = build_on_meta(config)
    facts = model_facts(config)
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
    return {"config": config, "facts": facts, "cost_growth": cost_growth}


def render_model_card(size: str, results: dict | None = None, repo_id: str | None = None) -> str:
    """The model card (YAML metadata + markdown) of PVT-`size` published as `repo_id`.

    `results` is a results JSON of `scripts/evaluate.py` / the trainer (see the module docstring); only then does the
    card carry `model-index` metadata and a "measured" section.
    """
    if size not in PVT_PRESETS:
        raise ValueError(f"Unknown PVT size {size!r}; choose one of {SIZES}.")
    repo_id = repo_id or default_repo_id(size)
    computed = _computed_facts(size)
    config, facts = computed["config"], computed["facts"]
    height, width = facts.image_size
    measured, eval_results = (None, None)
    if results is not None:
        measured, eval_results = _measured_results(results, repo_id.split("/")[-1])
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        license="apache-2.0",
        tags=TAGS,
        datasets=["imagenet-1k"],
        metrics=["accuracy"] if eval_results else None,
        model_name=repo_id.split("/")[-1] if eval_results else None,
        eval_results=eval_results,
    )
    backbone_height, backbone_width = BACKBONE_EXAMPLE_SIZE
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
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
    return str(card)


def _parse_results(entries: list[str]) -> dict[str, dict]:
    results = {}
    for entry in entries:
        size, separator, path = entry.partition("=")
        if not separator or size not in PVT_PRESETS:
            raise SystemExit(f"--results takes SIZE=PATH with SIZE in {SIZES}, got {entry!r}.")
        results[size] = json.loads(Path(path).read_text())
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=CARDS_DIR, help="Where the cards are (written or checked).")
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="Hub namespace of the repo ids in the cards.")
    parser.add_argument(
        "--results", action="append", default=[], metavar="SIZE=PATH", help="Measured results JSON of one size."
    )
    parser.add_argument("--check", action="store_true", help="Write nothing; exit 1 if a card differs or is missing.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = _parse_results(args.results)
    stale = []
    for size in SIZES:
        text = render_model_card(size, results.get(size), default_repo_id(size, args.namespace))
        path = card_path(size, args.output_dir)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    if stale:
        print("Stale or missing model cards (run python scripts/make_model_cards.py):", file=sys.stderr)
        for path in stale:
            print(f"  {path}", file=sys.stderr)
        return 1
    if args.check:
        print("Model cards are up to date.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
