"""Suite `difftpt_subsets`: `python eval/difftpt_subsets.py --methods zeroshot,tda --data-root DIR --out runs/x`
does what `vlm-tta bench --suite difftpt_subsets ...` does (the logic lives in vlm_tta.benchmark)."""

import sys

from vlm_tta.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--suite", "difftpt_subsets", *sys.argv[1:]]))
