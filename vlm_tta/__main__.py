"""``python -m vlm_tta`` runs the ``vlm-tta`` command (also under ``torchrun -m vlm_tta``)."""

import sys

from .cli import main

sys.exit(main())
