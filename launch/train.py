#!/usr/bin/env python
"""Training entry point: `accelerate launch launch/train.py --config configs/boss.yaml [key=value ...]`.

Also runs as plain `python launch/train.py ...` (one process, CPU or one GPU). See spkdist/train.py.
"""

import sys

from spkdist.train import main

if __name__ == "__main__":
    sys.exit(main())
