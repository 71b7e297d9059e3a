"""Suite `natural_shift`: `python eval/natural_shift.py --methods zeroshot,tda --data-root DIR --out runs/x`
does what `vlm-tta bench --suite natural_shift ...` does (the logic lives in vlm_tta.benchmark)."""

import sys

from vlm_tta.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "natural_shift", *sys.argv[1:]]))
