"""Suite `noisy_tta`: `python eval/noisy_tta.py --data-root DIR --out runs/ntta` does what
`vlm-tta ntta ...` does (the logic lives in vlm_tta.benchmark)."""

import sys

from vlm_tta.cli import main

if __name__ == "__main__":
    sys.exit(main(["ntta", "--suite", "noisy_tta", *sys.argv[1:]]))
