#!/usr/bin/env python
"""Convert an original PVT v1 checkpoint (github.com/whai362/PVT) into a `save_pretrained` folder.

    python scripts/convert_original_checkpoint.py --checkpoint pvt_small.pth --size small --output_dir pvt-small

Accepts the released `pvt_{tiny,small,medium,large}.pth` files and the authors' training checkpoints (weights under
"model"). The folder gets `model.safetensors`, `config.json` (ImageNet-1k labels, `auto_map`), the package's code
files and `preprocessor_config.json` (the original evaluation transform). The checkpoint is read with
`torch.load(weights_only=True)`; a file that needs arbitrary unpickling is refused unless you pass
`--allow_unsafe_pickle` for a file you trust. Any unknown, missing or mis-shaped weight stops the conversion and is
named.
"""

import argparse
import logging
import sys

from modeling_pvt import PVT_PRESETS
from modeling_pvt.hub.convert import UNSAFE_PICKLE_FLAG, CheckpointConversionError, convert_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Original checkpoint file (.pth).")
    parser.add_argument("--size", required=True, choices=list(PVT_PRESETS), help="PVT size the checkpoint is.")
    parser.add_argument("--output_dir", required=True, help="Folder to write (must be empty unless --overwrite).")
    parser.add_argument(
        UNSAFE_PICKLE_FLAG,
        action="store_true",
        help="Allow full unpickling when weights_only loading fails. Unpickling can run arbitrary code: only use "
        "this for files from a source you trust.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Write into a non-empty output folder.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        output_dir = convert_checkpoint(
            args.checkpoint,
            args.size,
            args.output_dir,
            allow_unsafe_pickle=args.allow_unsafe_pickle,
            overwrite=args.overwrite,
        )
    except (CheckpointConversionError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Converted PVT-{args.size} to {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
