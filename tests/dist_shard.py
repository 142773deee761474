"""Run under torchrun by tests/test_score_dist.py: `distributed.map_sharded` with every unit fine, then with a unit
that fails on one rank only. Each rank writes OUT/rankR.json with what it saw."""

import json
import sys
from pathlib import Path

from progadv_trl import distributed


def main(out: str) -> None:
    distributed.init()
    seen: dict = {"rank": distributed.rank(), "world": distributed.world_size()}
    costs = [5, 1, 4, 2, 3, 3, 1]
    seen["ok"] = distributed.map_sharded(lambda u: (u, distributed.rank()), list(range(len(costs))), costs)

    def fail_on_rank_1(u):
        if distributed.rank() == 1:
            raise ValueError(f"unit {u} is bad")
        return u

    try:
        seen["failing"] = distributed.map_sharded(fail_on_rank_1, list(range(len(costs))), costs)
    except ValueError as e:
        seen["failing_error"] = str(e)
    # Still in step afterwards: one more collective every rank joins.
    seen["after"] = distributed.map_sharded(lambda u: u * 10, [1, 2, 3], [1, 1, 1])
    distributed.finish()
    Path(out, f"rank{seen['rank']}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1])
