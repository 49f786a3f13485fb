"""The per-sample results table and its CSV file, written so that runs can resume.

One row per (model, attack, norm, ε, sample), with the columns ``COLUMNS``:

    model, attack, norm, eps, index, label, pred_clean, pred_adv, success,
    delta_l2, delta_linf, certified_radius_l2

``norm`` is ``l2`` or ``linf``; ``index`` is the sample's position in the dataset split;
``success`` is true when ``pred_adv != label`` (a sample misclassified clean is a success at
every ε, with δ = 0); ``delta_*`` are the norms of the adversarial perturbation, measured in
float64 in the model's input space (flattened; embeddings for text); an empty
``certified_radius_l2`` means no certificate was given.

Writing. The file starts as the header alone (written atomically). Each completed unit of
work, a *key* (model, attack, norm, ε, batch), is appended as one write followed by fsync.
A run killed mid-append leaves at most one incomplete key at the end of the file;
``ResultsFile`` drops it on resume (rewriting the file atomically), skips every complete
key, and appends the rest in the same order, so the final file equals that of an
uninterrupted run. A sidecar ``<file>.meta.json`` records each model's settings; resuming
with different settings is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from lipcert.atomic import write_text_atomic
from lipcert.errors import LipcertError

__all__ = ["COLUMNS", "Key", "ResultsFile", "read_results"]

COLUMNS = ["model", "attack", "norm", "eps", "index", "label", "pred_clean", "pred_adv",
           "success", "delta_l2", "delta_linf", "certified_radius_l2"]
_DTYPES = {"model": str, "attack": str, "norm": str, "eps": "float64", "index": "int64",
           "label": "int64", "pred_clean": "int64", "pred_adv": "int64", "success": bool,
           "delta_l2": "float64", "delta_linf": "float64", "certified_radius_l2": "float64"}
Key = tuple[str, str, str, float, int]  # model, attack, norm, eps, batch
# pandas 3 parses floats exactly by default (and deprecates the option); pandas 2 needs it.
_ROUND_TRIP = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}


def typed(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with exactly ``COLUMNS``, in order, with their dtypes."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise LipcertError(f"attack results lack the columns {', '.join(missing)}")
    return df[COLUMNS].astype(_DTYPES).reset_index(drop=True)


def read_results(path: str | Path) -> pd.DataFrame:
    """Read an attack results CSV (floats round-trip exactly)."""
    path = Path(path)
    try:
        df = pd.read_csv(path, keep_default_na=False, na_values={"certified_radius_l2": [""]},
                         dtype={"model": str, "attack": str, "norm": str}, **_ROUND_TRIP)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise LipcertError(f"cannot read attack results {path}: {err}") from err
    if list(df.columns) != COLUMNS:
        raise LipcertError(f"{path} is not an attack results file: expected the columns "
                           f"{','.join(COLUMNS)}, found {','.join(map(str, df.columns))}")
    try:
        return typed(df)
    except (ValueError, TypeError) as err:
        raise LipcertError(f"{path}: malformed attack results: {err}") from err


def to_csv_text(df: pd.DataFrame, header: bool = False) -> str:
    """CSV text of a table that already has ``COLUMNS`` with their dtypes."""
    return df.to_csv(index=False, header=header, lineterminator="\n", na_rep="")


class ResultsFile:
    """An attack results CSV being written by one run of one model.

    ``open`` checks the sidecar settings, drops an incomplete trailing key, and returns the
    file with the set of keys already complete; ``append`` adds one key's rows durably.
    """

    def __init__(self, path: Path, done: set[Key]) -> None:
        self.path, self.done = path, done

    @classmethod
    def open(cls, path: str | Path, model: str, settings: dict[str, Any],
             batches: list[list[int]], overwrite: bool = False) -> ResultsFile:
        """Prepare ``path`` for ``model``'s rows; ``batches`` lists each batch's indices."""
        path = Path(path)
        if path.is_dir():
            raise LipcertError(f"the output {path} is a directory; give a .csv file name")
        meta_path = path.with_name(path.name + ".meta.json")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LipcertError(f"cannot create the directory of {path}: {err}") from err
        if overwrite or not path.exists():
            write_text_atomic(path, ",".join(COLUMNS) + "\n")
            meta = {"format": "lipcert-attacks/1", "models": {model: settings}}
            write_text_atomic(meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
            return cls(path, set())
        meta = cls._read_meta(meta_path) if meta_path.exists() else {
            "format": "lipcert-attacks/1", "models": {}}
        df = cls._repair(path)
        own = df[df["model"] == model]
        recorded = meta["models"].get(model)
        if len(own) and recorded != settings:
            differ = sorted(k for k in {*settings, *(recorded or {})}
                            if (recorded or {}).get(k) != settings.get(k))
            raise LipcertError(
                f"{path} already holds results for {model} made with different settings "
                f"({', '.join(differ) or 'no record of them'}); use another output file or "
                "--overwrite"
            )
        meta["models"][model] = settings
        write_text_atomic(meta_path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        done, keep = cls._complete_keys(own, model, batches)
        stale = own.index.difference(keep)
        if len(stale):  # an append cut short: drop it, rewrite atomically
            df = df.drop(index=stale)
            write_text_atomic(path, to_csv_text(typed(df), header=True))
        return cls(path, done)

    @staticmethod
    def _read_meta(meta_path: Path) -> dict[str, Any]:
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta.get("models"), dict):
                raise ValueError("no 'models' section")
            return meta
        except (OSError, ValueError, AttributeError) as err:
            raise LipcertError(f"{meta_path} is unreadable ({err}); delete it and the "
                               "results file, or pass --overwrite") from err

    @staticmethod
    def _repair(path: Path) -> pd.DataFrame:
        """Read the file, first cutting a partial last line left by a killed append."""
        raw = path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            write_text_atomic(path, raw[: raw.rfind(b"\n") + 1].decode())
        if not path.read_bytes().strip():
            write_text_atomic(path, ",".join(COLUMNS) + "\n")
        return read_results(path)

    @staticmethod
    def _complete_keys(own: pd.DataFrame, model: str, batches: list[list[int]]
                       ) -> tuple[set[Key], pd.Index]:
        """Keys whose rows are exactly their batch's indices, and those rows' labels."""
        batch_of = {index: b for b, indices in enumerate(batches) for index in indices}
        done: set[Key] = set()
        keep: list[Any] = []
        if own.empty:
            return done, pd.Index(keep)
        batch_col = own["index"].map(batch_of)
        for (attack, norm, eps, batch), rows in own.groupby(
                [own["attack"], own["norm"], own["eps"], batch_col], sort=False):
            if rows["index"].tolist() == batches[int(batch)]:
                done.add((model, attack, norm, float(eps), int(batch)))
                keep.extend(rows.index)
        return done, pd.Index(keep)

    def append(self, key: Key, rows: pd.DataFrame) -> None:
        """Append one key's rows (``COLUMNS``, typed) in a single write, then fdatasync."""
        with open(self.path, "a", newline="") as f:
            f.write(to_csv_text(rows))
            f.flush()
            os.fdatasync(f.fileno())
        self.done.add(key)


def concat(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """One table of typed frames (an empty typed table for none)."""
    frames = list(frames)
    if frames:
        return pd.concat(frames, ignore_index=True)
    return typed(pd.DataFrame({c: pd.Series(dtype=_DTYPES[c]) for c in COLUMNS}))
