"""Data-parallel ``capture_dataset``: ranks split the windows of a dataset, write their shards
into one folder, and the folder reads back as the one-process capture (explicit
``rank``/``world_size`` in one process, and a real ``torchrun`` gloo group)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import interp
from interp import runs

NAMES = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
TEXTS = [("word " * n).strip() + f" {n}" for n in (3, 11, 1, 7, 12, 2, 9, 5, 4, 10, 6, 8, 13)]
KW = {"batch_size": 2, "length_window": 2, "progress": False}


@pytest.fixture(scope="module")
def llama():
    return interp.tiny("llama")


def _same(a: runs.DatasetActivations, b: runs.DatasetActivations) -> None:
    assert a.example.tolist() == b.example.tolist()
    assert a.position.tolist() == b.position.tolist()
    for name in NAMES:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool", [None, "mean"])
def test_ranks_split_windows_and_the_folder_reads_as_one(llama, tmp_path, pool):
    single = runs.capture_dataset(llama, TEXTS, NAMES, pool=pool, **KW)
    folder = tmp_path / "acts"
    passes = {0: [], 1: []}
    for rank in (0, 1):
        with llama.hooks(fwd=[("hook_embed", lambda t, h, r=rank: passes[r].append(t.shape[0]))]):
            part = runs.capture_dataset(
                llama, TEXTS, NAMES, pool=pool, to=folder, rank=rank, world_size=2, **KW
            )
        if rank == 0:  # rank 1's shards are not there yet: only its own, marked incomplete
            assert part.meta["complete"] is False and not (folder / "meta.json").exists()
            assert set(part.load().example.tolist()) == {0, 1, 2, 3, 8, 9, 10, 11}
    # windows of 2 batches of 2 texts: rank 0 has windows 0 and 2, rank 1 windows 1 and 3
    assert sum(passes[0]) == 8 and sum(passes[1]) == 5
    assert "complete" not in part.meta and json.loads((folder / "meta.json").read_text())
    _same(part.load(), single)
    # in memory, each rank gets its own rows
    own = runs.capture_dataset(llama, TEXTS, NAMES, pool=pool, rank=1, world_size=2, **KW)
    assert set(own.example.tolist()) == {4, 5, 6, 7, 12}
    # a one-process rerun finds every shard and recomputes nothing
    with llama.hooks(fwd=[("hook_embed", lambda t, h: pytest.fail("recomputed"))]):
        again = runs.capture_dataset(llama, TEXTS, NAMES, pool=pool, to=folder, **KW)
    _same(again.load(), single)


def test_bad_rank_arguments_raise(llama, tmp_path):
    for kw, match in (
        ({"rank": 0}, "both"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"rank": 0, "world_size": 0}, "world_size"),
    ):
        with pytest.raises(ValueError, match=match):
            runs.capture_dataset(llama, TEXTS, NAMES, **kw, **KW)
    with pytest.raises(ValueError, match="no inputs"):
        runs.capture_dataset(llama, TEXTS[:2], NAMES, rank=1, world_size=2, **KW)


SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import torch.distributed as dist
    import interp
    from interp import runs
    from interp.cache import atomic_write

    dist.init_process_group("gloo")
    model = interp.tiny("llama")
    texts, names, kw = json.loads(sys.argv[2])
    passes = []
    with model.hooks(fwd=[("hook_embed", lambda t, h: passes.append(t.shape[0]))]):
        out = runs.capture_dataset(model, texts, names, to=sys.argv[1], **kw)
    # Each rank's result goes to a file of its own: a record printed to the shared stdout pipe
    # was lost once (fresh-clone run), flush or not.
    result = json.dumps([dist.get_rank(), sum(passes), len(out)])
    path = Path(os.environ["RESULT_DIR"], f"{dist.get_rank()}.json")
    atomic_write(path, lambda tmp: Path(tmp).write_text(result))
    # After a barrier, leave without tearing gloo down: a rank exiting through destructors
    # while its peer still closes the group can abort ("terminate called without an active
    # exception"; seen under load).
    dist.barrier()
    os._exit(0)
    """
)


@pytest.mark.skipif(
    shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
    reason="torchrun not installed",
)
def test_torchrun_two_processes_equal_one(llama, tmp_path):
    single = runs.capture_dataset(llama, TEXTS, NAMES, **KW)
    script = tmp_path / "capture.py"
    script.write_text(SCRIPT)
    folder = tmp_path / "acts"
    torchrun = Path(sys.executable).parent / "torchrun"
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["RESULT_DIR"] = str(results_dir)
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(folder),
            json.dumps([TEXTS, NAMES, KW]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(tuple(json.loads(p.read_text())) for p in results_dir.glob("*.json"))
    rows = len(single)
    assert results == [(0, 8, rows), (1, 5, rows)]  # each rank ran its windows, got them all
    _same(
        runs.ShardedActivations(folder, json.loads((folder / "meta.json").read_text())).load(),
        single,
    )
