"""Model cards: generated from one template and computed facts, never stale, measured results only when given."""

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard
from PIL import Image
from script_launch import load_script

from modeling_pvt import PvtConfig, PvtForImageClassification, PvtImageProcessor
from modeling_pvt.hub.model_card import render_paper_size_card, render_trained_card
from modeling_pvt.hub.model_facts import PAPER_REPORTED, count_multiply_adds, count_parameters, format_giga
from modeling_pvt.hub.results import IMAGE_CLASSIFICATION, OBJECT_DETECTION, SEMANTIC_SEGMENTATION

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZES = ["tiny", "small", "medium", "large"]


make_model_cards = load_script("make_model_cards")

MEASURED = {
    "eval_accuracy": 0.7432,
    "eval_top5_accuracy": 0.9211,
    "dataset_name": "imagenet-1k",
    "split": "validation",
    "eval_samples": 50000,
}


def front_matter(text: str) -> str:
    """The YAML metadata block at the top of a card."""
    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match, "the card does not start with YAML metadata"
    return match.group(1)


@pytest.mark.parametrize("size", SIZES)
def test_committed_cards_are_up_to_date(size):
    committed = REPO_ROOT / "model_cards" / f"pvt-{size}.md"
    assert committed.is_file(), f"{committed} is missing: run python scripts/make_model_cards.py"
    assert committed.read_text(encoding="utf-8") == render_paper_size_card(size), (
        f"{committed} is stale: run python scripts/make_model_cards.py and commit the result"
    )


def test_check_mode_fails_on_a_stale_or_missing_card(tmp_path, capsys):
    assert make_model_cards.main(["--output_dir", str(tmp_path)]) == 0
    assert make_model_cards.main(["--check", "--output_dir", str(tmp_path)]) == 0
    card = tmp_path / "pvt-medium.md"
    card.write_text(card.read_text().replace("81.2", "82.0"))
    assert make_model_cards.main(["--check", "--output_dir", str(tmp_path)]) == 1
    assert "pvt-medium.md" in capsys.readouterr().err
    assert card.read_text().count("82.0") >= 1  # --check writes nothing
    card.unlink()
    assert make_model_cards.main(["--check", "--output_dir", str(tmp_path)]) == 1


@pytest.mark.parametrize("size", SIZES)
def test_cards_state_the_computed_facts_and_label_the_paper_numbers(size):
    text = render_paper_size_card(size)
    card = ModelCard(text)
    assert f"{count_parameters(size):,}" in text
    assert f"({format_giga(count_multiply_adds(size, 224))})" in text
    top1 = f"{PAPER_REPORTED[size].imagenet_top1:.1f}% top-1"
    assert re.search(r"\*\*Reported by the paper\*\*[^#]*" + re.escape(top1), text)
    for stride, channels in [(4, 64), (8, 128), (16, 320), (32, 512)]:
        assert f"| {stride} | {channels} |" in text
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-classification"
    assert data["license"] == "apache-2.0"
    assert data["datasets"] == ["imagenet-1k"]
    assert "pvt" in data["tags"]
    assert "model-index" not in front_matter(text) and card.data.eval_results is None
    assert "arXiv" in text and "Wang, Wenhai" in text and "Shao, Ling" in text
    assert f"accelerate launch scripts/train.py --model_name_or_path org/pvt-{size}" in text
    assert "scripts/finetune.py" in text


def test_model_index_only_from_measured_results():
    text = render_paper_size_card("tiny", results=MEASURED, repo_id="my-org/pvt-tiny")
    card = ModelCard(text)
    assert "model-index" in front_matter(text)
    results = {result.metric_type: result for result in card.data.eval_results}
    assert set(results) == {"accuracy", "top_5_accuracy"}
    assert results["accuracy"].metric_value == pytest.approx(0.7432)
    assert results["top_5_accuracy"].metric_value == pytest.approx(0.9211)
    assert results["accuracy"].dataset_type == "imagenet-1k"
    assert results["accuracy"].dataset_split == "validation"
    assert card.data.model_name == "pvt-tiny"
    assert "| Top-1 accuracy | 74.32% |" in text and "| Images evaluated | 50,000 |" in text
    assert "Not yet measured" not in text
    # the paper's number stays labelled as the paper's
    assert "75.1% top-1" in text


def test_results_without_what_model_index_needs_are_refused():
    where = {"dataset_name": "imagenet-1k", "split": "validation", "eval_samples": 10}
    with pytest.raises(ValueError, match="dataset_name"):
        render_paper_size_card("tiny", results={"eval_accuracy": 0.7, "split": "validation", "eval_samples": 10})
    with pytest.raises(ValueError, match="eval_accuracy"):
        render_paper_size_card("tiny", results=where)
    with pytest.raises(ValueError, match="fraction"):
        render_paper_size_card("tiny", results={**where, "eval_accuracy": 75.1})
    # The names of the old, second schema are not read.
    with pytest.raises(ValueError, match="dataset_name.*eval_samples"):
        render_paper_size_card("tiny", results={"eval_accuracy": 0.7, "dataset": "x", "split": "y", "num_samples": 3})


def test_results_option_of_the_script(tmp_path):
    results_file = tmp_path / "tiny.json"
    results_file.write_text(json.dumps(MEASURED))
    output_dir = tmp_path / "cards"
    assert make_model_cards.main(["--output_dir", str(output_dir), "--results", f"tiny={results_file}"]) == 0
    assert "model-index" in front_matter((output_dir / "pvt-tiny.md").read_text())
    assert "model-index" not in front_matter((output_dir / "pvt-small.md").read_text())


def test_repo_id_is_used_in_every_snippet():
    text = render_paper_size_card("small", repo_id="someone/my-pvt")
    assert "org/pvt-small" not in text
    assert text.count('"someone/my-pvt"') >= 5
    assert "--model_name_or_path someone/my-pvt" in text


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_usage_snippets_run(tmp_path):
    """The card's Python snippets run as written against a saved PVT-tiny (random weights) and a real photograph."""
    from PIL import Image
    from skimage import data as sample_images

    model_dir = tmp_path / "pvt-tiny"
    config = PvtConfig.from_preset("tiny", id2label={index: f"class {index}" for index in range(1000)})
    PvtForImageClassification(config).save_pretrained(model_dir)
    PvtImageProcessor().save_pretrained(model_dir)
    image_path = tmp_path / "cat.png"
    Image.fromarray(sample_images.chelsea()).save(image_path)

    text = render_paper_size_card("tiny", repo_id=str(model_dir))
    blocks = _python_blocks(text)
    assert len(blocks) == 3
    printed = io.StringIO()
    for block in blocks:
        with contextlib.redirect_stdout(printed):
            exec(block.replace("path/to/image.jpg", str(image_path)), {"__name__": "__card__"})
    output = printed.getvalue()
    assert "'label': 'class " in output  # the pipeline's answer
    assert output.count("class ") >= 5 + 5  # pipeline top-5 and the Auto-class top-5
    expected_backbone_output = re.search(r"which prints\n```\n(.*?)```", text, flags=re.DOTALL).group(1)
    assert output.endswith(expected_backbone_output)


@pytest.mark.parametrize("task", [IMAGE_CLASSIFICATION, SEMANTIC_SEGMENTATION, OBJECT_DETECTION], ids=lambda t: t.name)
def test_trained_cards_show_the_pipeline_of_their_task(task):
    card = render_trained_card(repo_id="org/run", task=task, title="A run", summary="Trained.")
    assert f'pipeline("{task.pipeline_tag}", model="org/run")' in card
    assert f'{task.auto_class}.from_pretrained("org/run")' in card


def test_the_pipeline_snippet_of_a_trained_classifier_card_runs(tmp_path):
    """The card's pipeline block, pointed at a saved folder and a real image, classifies it."""
    folder = tmp_path / "run"
    toy = {"hidden_sizes": [8, 16, 24, 32], "num_attention_heads": [1, 1, 1, 2], "depths": [1, 1, 1, 1]}
    config = PvtConfig(image_size=32, num_labels=2, id2label={0: "cat", 1: "dog"}, **toy)
    PvtForImageClassification(config).save_pretrained(folder)
    PvtImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    Image.fromarray(np.full((40, 48, 3), 128, dtype=np.uint8)).save(tmp_path / "image.jpg")
    card = render_trained_card(repo_id=str(folder), task=IMAGE_CLASSIFICATION, title="A run", summary="Trained.")
    snippet = re.search(r"With a pipeline:\n\n```python\n(.*?)```", card, flags=re.DOTALL).group(1)
    snippet = snippet.replace("path/to/image.jpg", str(tmp_path / "image.jpg"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet, {})
    assert {"cat", "dog"} == {row["label"] for row in eval(printed.getvalue())}
