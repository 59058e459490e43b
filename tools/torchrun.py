"""torchrun whose workers' bad input ends as their one ``error:`` line and exit status 2.

  python tools/torchrun.py --standalone --nproc-per-node 2 tools/pretrain_flextron.py ...

The flags are torchrun's (``python -m torch.distributed.run``). When every failed worker exited
with status 2 (a tool's refusal, already printed), this exits 2 without torchrun's
ChildFailedError report; any other failure keeps torchrun's report and traceback.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_flextron.cli import torchrun  # noqa: E402

if __name__ == "__main__":
    sys.exit(torchrun())
