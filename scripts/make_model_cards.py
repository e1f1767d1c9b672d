#!/usr/bin/env python
"""Write the model cards `model_cards/pvt-{tiny,small,medium,large}.md` of the paper's four sizes.

    python scripts/make_model_cards.py                     # (re)write the four cards
    python scripts/make_model_cards.py --check             # exit 1 if a committed card is stale
    python scripts/make_model_cards.py --results tiny=eval/pvt-tiny.json --namespace my-org --output_dir out

The cards come from `modeling_pvt.hub.model_card.render_paper_size_card`: every number is computed by
`modeling_pvt.hub.model_facts` or is the paper's ImageNet-1k top-1, labelled as reported by the paper. The
`model-index` metadata is written only from a results file (`--results size=path.json`, the schema of
`modeling_pvt.hub.results`) measured by `scripts/eval_classification.py` or a training script, never otherwise.
"""

import argparse
import json
import sys
from pathlib import Path

from modeling_pvt import PVT_PRESETS
from modeling_pvt.hub.model_card import DEFAULT_NAMESPACE, default_repo_id, render_paper_size_card

CARDS_DIR = Path(__file__).resolve().parents[1] / "model_cards"


def card_path(size: str, output_dir: Path = CARDS_DIR) -> Path:
    return Path(output_dir) / f"pvt-{size}.md"


def _parse_results(entries: list[str]) -> dict[str, dict]:
    results = {}
    for entry in entries:
        size, separator, path = entry.partition("=")
        if not separator or size not in PVT_PRESETS:
            raise SystemExit(f"--results takes SIZE=PATH with SIZE in {list(PVT_PRESETS)}, got {entry!r}.")
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
    for size in PVT_PRESETS:
        try:
            text = render_paper_size_card(size, results.get(size), default_repo_id(size, args.namespace))
        except ValueError as error:
            raise SystemExit(f"--results {size}: {error}") from error
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
