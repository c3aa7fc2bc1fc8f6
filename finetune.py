#!/usr/bin/env python
"""Finetune a trained language model with averaged SGD into a new run (awd-lstm-lm's finetune.py).

``python finetune.py SOURCE [main.py flags]`` is ``python main.py --finetune SOURCE [flags]`` (see
:mod:`awd_nonnormal.finetune`): the new run goes beside SOURCE as NAME.finetune.pt unless --save.

Example::

    python finetune.py runs/20240101-120000/model.pt --epochs 50   # -> runs/.../model.finetune.pt
"""

from __future__ import annotations

import sys
from typing import List, Optional

import main as main_script


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0] + "\n\nusage: python finetune.py SOURCE [main.py flags]; "
              "the flags are main.py's (python main.py --help), e.g. --epochs, --lr, --save, --overwrite")
        return 0 if argv else 2
    if argv[0].startswith("-"):
        print("finetune.py: error: the first argument is the checkpoint to finetune (a run's NAME.pt)",
              file=sys.stderr)
        return 2
    return main_script.main(["--finetune", argv[0], *argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
