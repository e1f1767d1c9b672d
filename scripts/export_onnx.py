#!/usr/bin/env python
"""Export a PVT classifier or backbone to ONNX for any batch size and input size.

    pvt-export-onnx --model_name_or_path Zetatech/pvt-tiny-224 --output_dir pvt-tiny-onnx
    pvt-export-onnx --model_name_or_path pvt-digits --task backbone --out_features stage2 stage4 --output_dir pvt-bb

The folder gets `model.onnx` (input `pixel_values`, batch, height and width symbolic; output `logits`, or one feature
map per backbone stage), `config.json` and `preprocessor_config.json`. The graph is run by ONNX Runtime at three
input sizes and compared with the PyTorch model before anything is written (`--check_sizes` to choose them). Needs
`pip install "modeling-pvt[onnx]"`. docs/onnx.md shows how to serve the export with onnxruntime.
"""

import argparse
import json
import logging
import sys

from modeling_pvt.hub.onnx_export import DEFAULT_CHECKS, DEFAULT_TOLERANCE, TASKS, OnnxExportError, export_onnx


def check_size(text: str) -> tuple[int, int, int]:
    """`BATCHxHEIGHTxWIDTH`, e.g. `1x800x1216`."""
    try:
        batch, height, width = (int(part) for part in text.lower().split("x"))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected BATCHxHEIGHTxWIDTH such as 1x320x480, got {text!r}") from error
    return batch, height, width


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="A saved model folder or a Hub id.")
    parser.add_argument("--output_dir", required=True, help="Folder to write model.onnx and the configs to.")
    parser.add_argument("--task", choices=TASKS, default="image-classification", help="Head to export.")
    parser.add_argument("--out_features", nargs="+", help="Backbone stages to output (default: the config's).")
    parser.add_argument("--revision", default="main", help="Branch, tag or commit of a Hub model.")
    parser.add_argument("--token", help="Hub token for private models.")
    parser.add_argument(
        "--check_sizes",
        nargs="+",
        type=check_size,
        help="Inputs (BATCHxHEIGHTxWIDTH) at which the graph is compared with PyTorch (default: the model's image "
        "size at batch 2, 3x320x480 and 1x800x1216).",
    )
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="Largest accepted difference.")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing model.onnx in the folder.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("modeling_pvt").setLevel(logging.INFO)
    try:
        output_dir = export_onnx(
            args.model_name_or_path,
            args.output_dir,
            task=args.task,
            out_features=args.out_features,
            checks=args.check_sizes or DEFAULT_CHECKS,
            tolerance=args.tolerance,
            opset_version=args.opset,
            overwrite=args.overwrite,
            revision=args.revision,
            token=args.token,
        )
    except (OnnxExportError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"wrote": str(output_dir / "model.onnx")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
