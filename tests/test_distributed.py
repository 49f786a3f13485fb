"""Processes sharing ``attack`` and ``certify`` (gloo on the CPU, started with
``torch.multiprocessing.spawn`` and torchrun's environment variables) write what one
process writes; a killed rank resumes from its part file; each certified weight norm is
computed once, by one rank, and an error there reaches every rank."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lipcert.checkpoint import save_run
from lipcert.cli import main as lipcert
from lipcert.distributed import World, block, resolve_device, world
from lipcert.errors import LipcertError
from lipcert.presets import preset
from lipcert.train import train

ATTACK = ["--data", "mnist", "--n", "25", "--batch-size", "10", "--attacks", "fgsm,pgdl2",
          "--eps-linf", "0.1", "--eps-l2", "0.5,1", "--attack-params",
          '{"pgdl2": {"steps": 5}}', "--quiet"]
CERTIFY = ["--data", "mnist", "--n", "600", "--no-lower"]  # 3 chunks of at most 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, job: Callable[..., None], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        job(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(size: int, job: Callable[..., None], *args: Any) -> None:
    """Run ``job(rank, *args)`` in ``size`` processes, as torchrun would start them."""
    mp.spawn(_worker, args=(size, _free_port(), job, args), nprocs=size, join=True)


def _commands(rank: int, commands: list[list[str]]) -> None:
    for command in commands:
        assert lipcert(command) == 0, command


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    return save_run(train(preset("vit-mnist-standard-tiny", steps=8), progress=False),
                    root / "vit")


def _certificate_numbers(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    for volatile in ("timing_s", "model"):  # seconds, and the source path
        doc.pop(volatile)
    return doc


def test_ranks_take_contiguous_uneven_blocks() -> None:
    blocks = [block(10, World(r, 3)) for r in range(3)]
    assert [list(b) for b in blocks] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [len(block(2, World(r, 3))) for r in range(3)] == [1, 1, 0]
    assert world() == World()  # no torchrun variables: one process


def test_devices(run, tmp_path, capsys) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(LipcertError, match="unknown device"):
        resolve_device("gpu")
    with pytest.raises(SystemExit):
        lipcert(["certify", str(run), "--device"])
    out = tmp_path / "cert.json"
    assert lipcert(["certify", str(run), *CERTIFY, "--n", "5", "--device", "auto", "-o",
                    str(out)]) == 0
    if torch.cuda.is_available():
        return
    assert resolve_device("auto") == torch.device("cpu")
    for command in (["certify", str(run), *CERTIFY, "-o", str(tmp_path / "c.json")],
                    ["attack", str(run), *ATTACK, "-o", str(tmp_path / "a.csv")]):
        capsys.readouterr()
        assert lipcert([*command, "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "no CUDA device" in err, err
        assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert.json"]


PRESETS = ["vit-mnist-lipschitz-tiny", "vit-mnist-certified-tiny",
           "gpt-shakespeare-lipschitz-tiny", "gpt-shakespeare-standard-tiny"]


def _train(rank: int, out: Path) -> None:
    from safetensors.torch import save_file

    # Muon's Newton–Schulz in float32 on every CPU. Where the CPU has native bfloat16, torch's
    # Muon runs it in bfloat16, and the gradient sums of 1 and 3 processes (the same terms in
    # another order) round to updates that differ at 2⁻⁸ relative (measured: up to 5e-3 after
    # 3 steps at lr 0.1); in float32 they stay within the tolerance below, which then tests the
    # distributed averaging rather than bfloat16 rounding.
    with mock.patch("lipcert.muon.native_bfloat16_matmul", return_value=False):
        for name in PRESETS:
            model = train(preset(name, steps=3), progress=False).model
            save_file(model.state_dict(), out / f"{name}.{rank}.safetensors")


def _job(rank: int, commands: list[list[str]], out: Path) -> None:
    _commands(rank, commands)
    _train(rank, out)


def _same_outputs(out: Path, one: Path) -> None:
    assert (out / "attacks.csv").read_bytes() == (one / "attacks.csv").read_bytes()
    assert (json.loads((out / "attacks.csv.meta.json").read_text())
            == json.loads((one / "attacks.csv.meta.json").read_text()))
    assert _certificate_numbers(out / "cert.json") == _certificate_numbers(one / "cert.json")


def test_three_processes_attack_certify_and_train_as_one(run, tmp_path) -> None:
    from safetensors.torch import load_file

    one, three = tmp_path / "one", tmp_path / "three"
    one.mkdir()
    three.mkdir()
    commands = [["attack", str(run), *ATTACK, "-o", str(three / "attacks.csv")],
                ["certify", str(run), *CERTIFY, "-o", str(three / "cert.json")]]
    _job(0, [[a.replace(str(three), str(one)) for a in c] for c in commands], one)
    spawn(3, _job, commands, three)
    _same_outputs(three, one)
    for name in PRESETS:
        alone = load_file(one / f"{name}.0.safetensors")
        ranks = [load_file(three / f"{name}.{r}.safetensors") for r in range(3)]
        for key, weight in alone.items():
            assert torch.equal(ranks[1][key], ranks[0][key]), (name, key)
            assert torch.equal(ranks[2][key], ranks[0][key]), (name, key)
            if key.endswith("attn.k.bias"):
                # Its gradient is 0 in exact arithmetic (softmax ignores a shift common to a
                # query's scores), so AdamW's normalised step follows rounding noise alone.
                continue
            # one process sums the batch's gradients in another order: close, not equal
            torch.testing.assert_close(ranks[0][key], weight, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in three.iterdir() if "safetensors" not in p.name) == [
        "attacks.csv", "attacks.csv.meta.json", "cert.json"]  # no part left behind


def _attack(rank: int, run: Path, out: Path, die_after: int | None, log: Path,
            certify: Path | None = None) -> None:
    from attacks.harness import run_attacks
    from lipcert import load
    from lipcert.data import load_dataset

    data = load_dataset("mnist")
    keys = []

    def on_key(key: tuple) -> None:
        keys.append(key)
        if rank == 1 and len(keys) == die_after:
            os._exit(1)  # killed, part file half done

    run_attacks(load(run), data.x_test[:25], data.y_test[:25], ["fgsm", "pgdl2"], [0.5, 1.0],
                [0.1], params={"pgdl2": {"steps": 5}}, batch_size=10, output=out,
                on_key=on_key)
    log.with_name(f"{log.name}.{rank}").write_text(json.dumps(len(keys)))
    if certify is not None:
        _commands(rank, [["certify", str(run), *CERTIFY, "-o", str(certify)]])


def test_two_processes_resume_a_killed_rank_and_certify_as_one(run, tmp_path) -> None:
    one, two, log = tmp_path / "one.csv", tmp_path / "two.csv", tmp_path / "keys"
    _attack(0, run, one, None, tmp_path / "single", tmp_path / "one.json")
    with pytest.raises(mp.ProcessExitedException):
        spawn(2, _attack, run, two, 2, log)
    part = two.with_name("two.rank1-of-2.csv").read_text().splitlines()
    assert len(part) == 1 + 2 * 5  # the header and two keys of its batch of 5
    spawn(2, _attack, run, two, None, log, tmp_path / "two.json")
    assert two.read_bytes() == one.read_bytes()
    assert (_certificate_numbers(tmp_path / "two.json")
            == _certificate_numbers(tmp_path / "one.json"))
    assert not list(tmp_path.glob("two.rank*"))
    # rank 1 holds batch 2 (5 samples): fgsm at 0.1, pgdl2 at 0.5 and 1; two were done
    assert json.loads(log.with_name("keys.1").read_text()) == 1


def _shared_entries(cache: dict) -> dict[str, Any]:
    """The shared norm-cache entries as JSON-able values (floats, lists of floats)."""
    from lipcert.norm_shards import SHARED_KINDS

    return {repr(k): v.tolist() if isinstance(v, torch.Tensor) else v
            for k, v in dict.items(cache) if k[1] in SHARED_KINDS}


def _wait_for(flag: Path) -> None:
    while not flag.exists():
        time.sleep(0.01)


def _split_norms(rank: int, run: Path, propagating: list[int], out: Path) -> None:
    from lipcert import load
    from lipcert.bounds import Propagator
    from lipcert.norm_shards import lend_norms, share_norms, sharing

    torch.manual_seed(0)
    model, x = load(run), torch.rand(2, 1, 28, 28)
    helped = out / "helped"
    with sharing(propagating):
        if rank in propagating:
            prop = Propagator.from_model(model, x)
            share_norms(prop, (0.0, 1.0), x.shape[1:])
            if propagating == [0]:
                _wait_for(helped)  # every entry is claimed by now
            prop.run((0.0, 1.0), sample_shape=x.shape[1:])
            cache = prop.norm_cache
        else:
            cache = lend_norms(model, x, domain=(0.0, 1.0), method="exact",
                               device=torch.device("cpu"))
            helped.touch()
    (out / f"{rank}.json").write_text(json.dumps(
        {"computed": [repr(k) for k in cache.computed], "entries": _shared_entries(cache)}))
    dist.barrier()  # rank 0 serves the store until every rank is done with it


@pytest.mark.parametrize("size, propagating", [(2, [0]), (3, [0, 1])])
def test_the_ranks_split_exactly_the_norms_a_propagation_computes(run, tmp_path, size,
                                                                   propagating) -> None:
    from lipcert import load
    from lipcert.bounds import Propagator

    torch.manual_seed(0)
    model, x = load(run), torch.rand(2, 1, 28, 28)
    alone = Propagator.from_model(model, x)
    alone.run((0.0, 1.0), sample_shape=x.shape[1:])
    wanted = _shared_entries(alone.norm_cache)
    assert sum("'opnorm'" in k for k in wanted) >= 6 and any("'rownorms'" in k for k in wanted)
    spawn(size, _split_norms, run, propagating, tmp_path)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(size)]
    computed = [set(r["computed"]) for r in ranks]
    assert sum(map(len, computed)) == len(set().union(*computed))  # each entry once
    assert set().union(*computed) == set(wanted)  # all of them, nothing more
    for r in propagating:  # a propagating rank ends with one process's values, bit for bit
        assert ranks[r]["entries"] == wanted
    if propagating == [0]:  # the helper's walk listed every entry; rank 0 fetched them all
        assert computed == [set(), set(wanted)]


@pytest.mark.parametrize("name", [None, "vit-mnist-certified-tiny",
                                  "gpt-shakespeare-standard-tiny"])
def test_the_walk_lists_the_norms_a_propagation_computes_in_order(run, tmp_path,
                                                                   name) -> None:
    """The helper's walk (stand-in norms, no interval refinement) asks for exactly the
    shared entries that a global propagation computes, in the same order: what lets a
    helper claim them from the back of the graph."""
    from lipcert.bounds import Propagator, as_program
    from lipcert.loading import load_model
    from lipcert.norm_shards import SHARED_KINDS, _walk
    from lipcert.samples import select_samples

    if name is not None:
        run = save_run(train(preset(name, steps=2), progress=False), tmp_path / name)
    samples = select_samples(load_model(str(run)), None, 2)
    program = as_program(samples.classifier, samples.inputs[:2])
    alone = Propagator(program)
    alone.run(samples.domain, sample_shape=samples.inputs.shape[1:])
    wanted = [k for k in alone.norm_cache if k[1] in SHARED_KINDS]
    assert any(k[1] == "opnorm" for k in wanted) and any(k[1] == "rownorms" for k in wanted)
    listed = _walk(Propagator(program), samples.domain, samples.inputs.shape[1:],
                   torch.device("cpu"))
    assert list(listed) == wanted


def _failing_norm(rank: int, run: Path, out: Path) -> None:
    import lipcert.norm_shards as norm_shards
    from lipcert import load
    from lipcert.bounds import Propagator
    from lipcert.certify_shards import certify_shared

    failed = out / "failed"
    if rank == 1:
        def fail(*args: Any) -> float:
            failed.touch()
            raise LipcertError("norm failed on rank 1")

        norm_shards._opnorm_on = fail  # every matrix norm the helper claims fails
    else:
        propagate = Propagator.run

        def later(*args: Any, **kwargs: Any) -> Any:
            _wait_for(failed)  # the helper has claimed a matrix and failed on it
            return propagate(*args, **kwargs)

        Propagator.run = later
    torch.manual_seed(0)
    x = torch.rand(3, 1, 28, 28)
    try:
        certify_shared(load(run), x, torch.zeros(3, dtype=torch.long), indices=[0, 1, 2],
                       eps=[0.5])
    except LipcertError as err:
        (out / f"{rank}.txt").write_text(str(err))


def test_an_error_in_one_ranks_norm_reaches_every_rank(run, tmp_path) -> None:
    spawn(2, _failing_norm, run, tmp_path)
    assert [(tmp_path / f"{r}.txt").read_text() for r in range(2)] == [
        "norm failed on rank 1"] * 2


def test_two_processes_certify_a_single_chunk_as_one(run, tmp_path) -> None:
    """At most 256 samples: rank 0 alone propagates, the other rank only lends norms."""
    commands = [["certify", str(run), "--data", "mnist", "--n", "30", "--no-lower",
                 "--mode", mode, "-o", str(tmp_path / f"{{}}-{mode}.json")]
                for mode in ("global", "local")]
    _commands(0, [[a.format("one") for a in c] for c in commands])
    spawn(2, _commands, [[a.format("two") for a in c] for c in commands])
    for mode in ("global", "local"):
        assert (_certificate_numbers(tmp_path / f"two-{mode}.json")
                == _certificate_numbers(tmp_path / f"one-{mode}.json"))
