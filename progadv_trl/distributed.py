"""Scoring across processes: `torchrun --nproc_per_node K -m progadv_trl.cli score|evaluate ...`.

Every rank loads and validates the same inputs and renders every trajectory (so a bad record is found, and skipped
or reported, identically everywhere, before any collective). The engine's own work units - padded batches (longest
first, so a batch holds trajectories of similar length) and shared-prefix groups (`prefix.py`) - are then dealt to
the ranks greedily by the tokens they run, heaviest first (LPT: each unit to the least-loaded rank), so the ranks
finish together; a group heavier than a rank's share is cut into its continuation batches, and each rank that gets
some of them runs the group's prefix once. Every batch a rank runs is one the single-process plan runs - the same
rows in the same order, padded to the same length, over the same prefix - which is what makes the output
byte-identical to a single process's (a trajectory padded to another length, batched with other rows or over
another prefix may come out different in the last bits: reductions are blocked by shape). Each rank's per-token
statistics are gathered to the main process in input order (`gather_object`, over gloo: the objects live in CPU
memory), which alone finishes the scores, writes and prints; the other ranks return None.

Errors: every rank joins every collective. Failures before sharding (a bad record, a chat template that cannot
render a trajectory) happen identically on every rank. A failure inside a rank's shard (say, out of memory on one
GPU) is caught and sent to the main process with the gather, which raises it (a note names the rank; `RankError`
when it cannot be pickled); the failing rank raises it too. No rank is left waiting in a collective that another
never joins.

Processes: only when WORLD_SIZE > 1 (torchrun, `accelerate launch` with several processes) is a process group
initialised; otherwise every function here is the single-process code path, unchanged. `--device cuda` means
cuda:LOCAL_RANK under torchrun. torch is imported lazily (`progadv --help` stays light).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    """Several processes (WORLD_SIZE > 1)."""
    return world_size() > 1


def device(device: str | None) -> str | None:
    """`cuda` (no index) means this rank's local GPU under torchrun; anything else is kept."""
    if device is not None and device.strip() == "cuda" and active():
        return f"cuda:{local_rank()}"
    return device


def init(device_: str | None = None) -> None:
    """Initialise the default process group once, when WORLD_SIZE > 1: gloo, plus nccl for CUDA tensors when the
    models run on a GPU (object collectives go over gloo either way: their payload is in CPU memory)."""
    if not active():
        return
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    dev = device(device_)
    backend = "gloo"
    if dev is not None and dev.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(torch.device(dev))
        backend = "cpu:gloo,cuda:nccl"
    # The main process evaluates and writes while the others wait for nothing (they are done), but ranks that finish
    # their shard early wait in the gather for the slowest: allow long shards.
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=6))


def shard(costs: Sequence[float], n_ranks: int) -> list[list[int]]:
    """Unit indices per rank: heaviest first, each to the least-loaded rank (ties: lower rank); each rank's list in
    input order. Deterministic, so every rank computes the same split."""
    loads = [0.0] * n_ranks
    out: list[list[int]] = [[] for _ in range(n_ranks)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(n_ranks), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += costs[i]
    return [sorted(o) for o in out]


class RankError(RuntimeError):
    """Another rank failed inside its shard; the message names it."""


def map_sharded(fn: Callable, units: Sequence, costs: Sequence[float]) -> list | None:
    """[fn(unit) for unit in units] with the units spread over the ranks (`shard`); on the main process the results
    in unit order, None elsewhere. Single process: every unit here, in order. Every rank joins the gather, whatever
    failed locally; then a failure anywhere is raised on the main process (and on the rank where it happened)."""
    if not active():
        return [fn(u) for u in units]
    mine = shard(costs, world_size())[rank()]
    gathered = gather_results(lambda: [(i, fn(units[i])) for i in mine])
    if gathered is None:
        return None
    out: list = [None] * len(units)
    for part in gathered:
        for i, res in part:
            out[i] = res
    return out


def gather_results(local: Callable[[], list]) -> list[list] | None:
    """Run `local()` on this rank and gather every rank's list to the main process (a list per rank there, None
    elsewhere). Every rank joins the gather, whatever failed locally; a failure anywhere is raised on the main
    process (a note names the rank) and on the rank where it happened."""
    import torch.distributed as dist

    init()
    payload: dict = {"rank": rank(), "ok": True}
    error: BaseException | None = None
    try:
        payload["results"] = local()
    except BaseException as e:  # noqa: BLE001 - this rank still joins the gather below
        error = e
        payload = {"rank": rank(), "ok": False, "error": _picklable(e)}
    gathered: list | None = [None] * world_size() if is_main() else None
    dist.gather_object(payload, gathered, dst=0)
    if error is not None:
        raise error
    if not is_main():
        return None
    assert gathered is not None
    failed = [p for p in gathered if not p["ok"]]
    if failed:
        e = failed[0]["error"]
        if isinstance(e, BaseException):
            e.add_note(f"(raised on rank {failed[0]['rank']} of {world_size()})")
            raise e
        raise RankError(f"rank {failed[0]['rank']} failed: {e}")
    return [p["results"] for p in gathered]


def _picklable(e: BaseException):
    """The exception itself when it survives pickling, else its message."""
    try:
        e2 = pickle.loads(pickle.dumps(e))
        if isinstance(e2, BaseException):
            return e2
    except Exception:  # noqa: BLE001
        pass
    return f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------------------------
# The scorer's paths (`ProgressScorer.score` / `score_many`, sharded)


def units(scorer, rendered) -> list:
    """The engine's own work units for `rendered`: padded batches (lists of indices) and, with `share_prefix`,
    `prefix.SharedGroup`s (a shared prompt and its continuation batches)."""
    return scorer.units(rendered)


def _cost(unit, rendered) -> float:
    """Tokens the unit runs through each model, padding included (a shared prefix once)."""
    if hasattr(unit, "cost"):  # prefix.Chain: a trajectory's as-generated rows, their distinct tokens
        return unit.cost
    if hasattr(unit, "batches"):
        P = unit.prefix_len
        return P + sum(len(b) * (max(len(rendered[i].input_ids) for i in b) - P) for b in unit.batches)
    return len(unit) * max(len(rendered[i].input_ids) for i in unit)


def pieces(work: list, rendered, n_ranks: int) -> list[tuple[int, object]]:
    """(unit index, piece) to deal: every unit whole, except a shared-prefix group heavier than a rank's fair share,
    which is cut into its continuation batches (each rank that gets some runs the prefix once for them: the same
    numbers, the prefix run is the same)."""
    import dataclasses

    fair = sum(_cost(u, rendered) for u in work) / max(1, n_ranks)
    out = []
    for k, u in enumerate(work):
        if n_ranks > 1 and hasattr(u, "batches") and len(u.batches) > 1 and _cost(u, rendered) > fair:
            out.extend((k, dataclasses.replace(u, batches=[b])) for b in u.batches)
        else:
            out.append((k, u))
    return out


def merge_pieces(mine: list[tuple[int, object]]) -> list:
    """One rank's pieces as units to run: the pieces of one cut group back together (its batches in plan order)."""
    import dataclasses

    merged: dict[int, object] = {}
    for k, piece in mine:
        if k in merged and hasattr(piece, "batches"):
            merged[k] = dataclasses.replace(merged[k], batches=merged[k].batches + piece.batches)
        else:
            merged[k] = piece
    return [merged[k] for k in sorted(merged)]


def token_stats(scorer, rendered, progress: bool = False) -> list | None:
    """`scorer.token_stats(rendered)`, its work units (padded batches, shared-prefix groups) spread over the ranks;
    the full list on the main process (input order), None elsewhere."""
    if not active():
        return scorer.token_stats(rendered, progress=progress)
    work = pieces(units(scorer, rendered), rendered, world_size())
    assigned = [work[i] for i in shard([_cost(p, rendered) for _, p in work], world_size())[rank()]]
    todo = merge_pieces(assigned)
    bar = None
    if progress and is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"scoring (rank 0 of {world_size()})", unit="batch", disable=None)

    def local() -> list:
        out = []
        for unit in todo:
            # each unit as the single-process plan runs it: the same bits (a subset planned again could differ)
            out.extend(scorer.run_unit(rendered, unit))
            if bar is not None:
                bar.update(1)
        return out

    try:
        gathered = gather_results(local)
    finally:
        if bar is not None:
            bar.close()
    if gathered is None:
        return None
    out: list = [None] * len(rendered)
    for part in gathered:
        for i, st in part:
            out[i] = st
    return out


def score(scorer, trajectories, *, with_token_ratios: bool = False, progress: bool = False, skipped: list | None = None):
    """`ProgressScorer.score` across the ranks: the scores on the main process, None elsewhere."""
    if not active():
        return scorer.score(trajectories, with_token_ratios=with_token_ratios, progress=progress, skipped=skipped)
    from .engine import _warn_faults, finish_score

    trajs, rendered = scorer.render(trajectories, skipped)
    stats = token_stats(scorer, rendered, progress=progress)
    if stats is None:
        return None
    scores = [finish_score(t, r, s, scorer.config, with_token_ratios=with_token_ratios) for t, r, s in zip(trajs, rendered, stats)]
    _warn_faults(scores)
    return scores


def score_many(scorer, trajectories, configs: dict, *, progress: bool = False, skipped: list | None = None):
    """`ProgressScorer.score_many` across the ranks: {name: scores} on the main process, None elsewhere."""
    if not active():
        return scorer.score_many(trajectories, configs, progress=progress, skipped=skipped)
    from .engine import _warn_faults, finish_score

    if any(c.temperature != scorer.config.temperature for c in configs.values()):
        raise ValueError("score_many: every config must use the scorer's temperature")
    trajs, rendered = scorer.render(trajectories, skipped)
    stats = token_stats(scorer, rendered, progress=progress)
    if stats is None:
        return None
    out = {name: [finish_score(t, r, s, c) for t, r, s in zip(trajs, rendered, stats)] for name, c in configs.items()}
    if out:
        _warn_faults(next(iter(out.values())))
    return out


def finish(barrier: bool = False) -> None:
    """Tear the process group down (end of a command). `barrier` after a success: no rank tears gloo down while a
    peer is still writing (that peer aborts, "terminate called without an active exception"); never after an error,
    where a peer may not come."""
    if not active():
        return
    import torch.distributed as dist

    if dist.is_initialized():
        if barrier:
            import datetime

            try:  # gloo's monitored barrier gives up on a rank that never comes, not after the group's 6 hours
                dist.monitored_barrier(timeout=datetime.timedelta(minutes=30))
            except RuntimeError:
                pass  # a rank that did not come, or a backend without it: tear down all the same
        dist.destroy_process_group()
