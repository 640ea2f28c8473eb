"""The strategy registry: which strategies each profile runs, and which are references.

References (no theft; S is the best of them) and thefts (A_j is the best of them):

| profile          | references                                   | thefts                              |
|------------------|----------------------------------------------|-------------------------------------|
| `breach`         | scratch, logreg, mlp, knn                    | substitute, finetune, head_only,    |
|                  |                                              | selftrain, logspread                |
| `breach+queries` | the above + distill_qnn, distill_mlp         | the above + insider                 |
| `queries`        | scratch, logreg, mlp, knn, distill_qnn,      | (none: no breach)                   |
|                  | distill_mlp                                  |                                     |
| `coalition`      | scratch, logreg, mlp, knn                    | substitute, finetune, head_only,    |
|                  |                                              | selftrain, logspread (glue fitted   |
|                  |                                              | to the logs)                        |
"""

from __future__ import annotations

from qumos.attack import insider, logbased, references, whitebox
from qumos.attack.config import (  # noqa: F401  (the tables live with the profiles)
    BASE_REFERENCES,
    QUERY_REFERENCES,
    THEFTS,
    WHITE_BOX,
    references_of,
    strategies_of,
    thefts_of,
)

FUNCS = {
    "scratch": references.scratch,
    "logreg": references.logreg,
    "mlp": references.mlp,
    "knn": references.knn,
    "distill_qnn": references.distill_qnn,
    "distill_mlp": references.distill_mlp,
    "substitute": whitebox.substitute,
    "finetune": whitebox.finetune,
    "head_only": whitebox.head_only,
    "selftrain": logbased.selftrain,
    "logspread": logbased.logspread,
    "insider": insider.insider,
}
ALL = tuple(FUNCS)
