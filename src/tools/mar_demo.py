"""`make mar-demo`: MAR on the synthetic benchmark, source A -> target B, end to end.

For each seed: stage 1 (source pretraining on A), the direct-transfer evaluation of that model
on B, stage 2 (MAR from the stage-1 checkpoint, unlabelled B), and the supervised-on-B upper
bound (the stage-1 recipe trained on B's labels). Every row is evaluated by `src.eval` with the
same protocol on B's query/gallery (cosine distance, standard AP). Prints the three-row table
(mean ± std over seeds) and writes `results.json` (metrics and stage times per seed) and
`results.md` into the output folder.

This is `python -m src.tools.uda_demo --methods mar supervised --out logs/mar_demo`: the runs,
their overrides and the table are that demo's, and every option of it works here.

    python -m src.tools.mar_demo                    # seed 0 (about 13 minutes on 2 CPU cores)
    python -m src.tools.mar_demo --seeds 0 1 2      # the study in docs/results.md
    python -m src.tools.mar_demo --quick --out /tmp/mar_demo   # tiny data, 1 epoch (tests)
    python -m src.tools.mar_demo trainer.max_epochs=4          # extra overrides for every run
"""

from __future__ import annotations

from collections.abc import Sequence

from src.tools.uda_demo import DIRECT, METHODS
from src.tools.uda_demo import main as uda_demo_main

__all__ = ["ROWS", "main"]

ROWS = (DIRECT, METHODS["mar"], METHODS["supervised"])


def main(argv: Sequence[str] | None = None) -> int:
    return uda_demo_main(argv, methods=("mar", "supervised"), out="logs/mar_demo",
                         description=__doc__)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
