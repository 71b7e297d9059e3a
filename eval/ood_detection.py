"""Suite `ood_detection`: `python eval/ood_detection.py --data-root DIR --out runs/ood` does what
`vlm-tta ood ...` does (the logic lives in vlm_tta.benchmark)."""

import sys

from vlm_tta.cli import main

if __name__ == "__main__":
    sys.exit(main(["ood", "--suite", "ood_detection", *sys.argv[1:]]))
