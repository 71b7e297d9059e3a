"""Suite `cross_dataset`: `python eval/cross_dataset.py --methods zeroshot,tda --data-root DIR --out runs/x`
does what `vlm-tta bench --suite cross_dataset ...` does (the logic lives in vlm_tta.benchmark)."""

import sys

from vlm_tta.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "cross_dataset", *sys.argv[1:]]))
