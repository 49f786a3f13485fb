"""Attack batches shared among torchrun's processes, their rows merged by rank 0.

Each rank attacks a contiguous block of whole batches (``lipcert.distributed.block``), so
every batch holds the samples, and gets the seeds, it gets in a single process (seeds come
from the batch's number, never from the rank; ``attacks.harness``): its rows are the same
numbers. Rank 0 opens the output first (checks the settings on resume, drops a cut-off
append) and tells every rank which keys it already holds; each rank appends its own keys
to its part file ``<stem>.rank<R>-of-<N>.csv`` (resumable batch by batch, like the output
itself; a killed run resumes with the same number of processes). At the end rank 0 gathers
every rank's rows over the process group (parts stay on their own machine), writes the
output with the rows in the order one process writes them, and only then do the ranks
delete their parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from attacks.results import Key, ResultsFile, concat, read_results, to_csv_text, typed
from lipcert.atomic import write_text_atomic
from lipcert.distributed import World, gather, on_main, world

__all__ = ["canonical_order", "merge_shards", "open_shard", "part_path"]


def part_path(output: Path, w: World) -> Path:
    """Rank ``w.rank``'s part file of ``output``."""
    return output.with_name(f"{output.stem}.rank{w.rank}-of-{w.size}{output.suffix}")


def open_shard(output: Path, model: str, settings: dict[str, Any],
               batches: list[list[int]], overwrite: bool) -> tuple[ResultsFile, set[Key]]:
    """The file this rank appends to and the keys no rank needs to attack again: the
    output itself in a single process; under torchrun this rank's part, the keys done
    being those of the output (opened by rank 0) and of the part."""
    w = world()
    if w.size == 1:
        results = ResultsFile.open(output, model, settings, batches, overwrite)
        return results, set(results.done)
    done = on_main(lambda: ResultsFile.open(output, model, settings, batches, overwrite).done)
    part = ResultsFile.open(part_path(output, w), model, settings, batches, overwrite)
    return part, done | part.done


def canonical_order(df: pd.DataFrame, attacks: Sequence[str],
                    grids: dict[str, list[float]], batches: list[list[int]]) -> pd.DataFrame:
    """``df`` (one model's rows) in the order one process writes them: by attack, batch,
    ε within its grid, then sample within its batch."""
    attack_pos = {a: k for k, a in enumerate(attacks)}
    batch_of = {i: b for b, rows in enumerate(batches) for i in rows}
    pos_of = {i: p for rows in batches for p, i in enumerate(rows)}
    eps_pos = [grids[n].index(e) for n, e in zip(df["norm"], df["eps"], strict=True)]
    keys = pd.DataFrame({"a": df["attack"].map(attack_pos), "b": df["index"].map(batch_of),
                         "e": eps_pos, "p": df["index"].map(pos_of)}, index=df.index)
    order = keys.sort_values(["a", "b", "e", "p"], kind="stable").index
    return df.loc[order].reset_index(drop=True)


def merge_shards(output: Path | None, model: str, own: pd.DataFrame, attacks: Sequence[str],
                 grids: dict[str, list[float]], batches: list[list[int]]) -> pd.DataFrame:
    """Every rank's rows of ``model``, in one process's order, on every rank; with
    ``output``, rank 0 writes them there (after the other models' rows) and each rank then
    deletes its part. ``own``: this rank's rows (read from its part when there is one)."""
    w = world()
    part = None if output is None else part_path(output, w)
    if part is not None:
        rows = read_results(part)
        own = rows[rows["model"] == model]
    shards = gather(own)

    def merge() -> pd.DataFrame:
        assert shards is not None
        earlier = read_results(output) if output is not None else concat([])
        frames = [earlier[earlier["model"] == model], *shards]
        mine = typed(pd.concat(frames, ignore_index=True)).drop_duplicates(
            ["attack", "norm", "eps", "index"])
        mine = canonical_order(mine, attacks, grids, batches)
        if output is not None:
            others = earlier[earlier["model"] != model]
            text = to_csv_text(typed(pd.concat([others, mine], ignore_index=True)),
                               header=True)
            write_text_atomic(output, text)
        return mine

    merged = on_main(merge)
    if part is not None:
        part.unlink()
        part.with_name(part.name + ".meta.json").unlink(missing_ok=True)
    return merged
