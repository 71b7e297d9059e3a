"""Runs spread over torchrun ranks (vlm_tta.distributed, vlm_tta.benchmark.distributed): the rows
are the single process's, a dead rank's work is finished by running the command again.

The rank logic is tested in one process (ranks driven one after the other, the way a world's ranks
interleave); the torchrun tests start two gloo processes on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tiny_models
import torch
import yaml
from bench_worker import tiny_suite  # (also registers the test methods _running, _slow and _pause)
from fake_datasets import make_coop, write_corrupt

from vlm_tta.benchmark.distributed import (
    RankWork,
    block_size,
    load_partial,
    merge_run_info,
    partial_path,
    save_partial,
    share,
)
from vlm_tta.benchmark.results import ResultStore
from vlm_tta.benchmark.runner import BenchmarkError, JobOutput, Runner, parse_methods
from vlm_tta.benchmark.suites import parse_suite
from vlm_tta.cli import main
from vlm_tta.distributed import DistributedError, World, rank_device, torchrun_env, torchrun_world

WORKER = Path(__file__).parent / "bench_worker.py"
#: fields that differ between any two runs (timing, memory, the clock) or that say how a row was made
VOLATILE = {"seconds_per_image", "method_seconds_per_image", "peak_memory_mb", "finished_at"}


@pytest.fixture(scope="module")
def model(cfg_file):
    from vlm_tta.models import load_model

    return load_model(cfg_file, pretrained=None)


def runner(suite: dict, model, data_root, out: Path, **kw) -> Runner:
    kw.setdefault("cache", out.parent / f"{out.name}_cache")  # each run its own cache: the encoder runs
    return Runner(
        parse_suite(suite), parse_methods(suite["methods"]), model, data_root, out, batch_size=2,
        log=kw.pop("log", lambda _: None), **kw,
    )  # fmt: skip


def assert_same_rows(single: Path, other: Path, exact: bool = False) -> None:
    """Every row and its arrays equal, but for timing, memory, the clock and split_over_ranks.

    Labels, predictions, counts and every non-float field must be identical. Floats (metrics, logits,
    scores) are compared to float rounding by default: an image's embeddings are encoded once, in the
    batch of whichever job reaches it first (which differs between ranks and one process), and on
    some CPUs the encoder's kernels round differently with the batch (seen: logits 2e-6 apart).
    ``exact=True`` asks for bit-identity."""
    a, b = ResultStore(single), ResultStore(other)
    rows_a, rows_b = ({r["job_id"]: r for r in s.rows()} for s in (a, b))
    assert rows_a.keys() == rows_b.keys() and rows_a
    for jid, row in rows_a.items():
        other_row = dict(rows_b[jid])
        other_row["config"] = {k: v for k, v in other_row["config"].items() if k != "split_over_ranks"}
        row, other_row = ({k: v for k, v in r.items() if k not in VOLATILE} for r in (row, other_row))
        what = (row["dataset"], row["method_label"])
        if exact:
            assert row == other_row, what
        else:
            assert row.keys() == other_row.keys(), what
            for key, value in row.items():
                expected = pytest.approx(value, rel=1e-6, abs=1e-9) if isinstance(value, float) else value
                assert other_row[key] == expected, (*what, key)
        arrays_a, arrays_b = a.arrays(jid), b.arrays(jid)
        assert arrays_a.keys() == arrays_b.keys()
        for name in arrays_a:
            if exact or arrays_a[name].dtype.kind in "iub":
                assert np.array_equal(arrays_a[name], arrays_b[name]), (*what, name)
            else:
                np.testing.assert_allclose(arrays_a[name], arrays_b[name], rtol=1e-4, atol=1e-5, err_msg=str(what))


def run_ranks(make_runner, size: int, order=None) -> list[RankWork]:
    """The ranks of a world one after the other (``order``), then rank 0's end of run."""
    works = {r: RankWork(make_runner(), r, size) for r in range(size)}
    for r in order or range(size):
        works[r].run()
    works[0].finish()
    return list(works.values())


# --------------------------------------------------------------------------- the pieces
def test_share_deals_blocks_of_positions_round_robin():
    assert [share(11, r, 3, 2).tolist() for r in range(3)] == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10]]
    assert share(3, 2, 4, 64).tolist() == []  # more ranks than blocks: an empty share
    parts = np.concatenate([share(1000, r, 7, 64) for r in range(7)])
    assert sorted(parts.tolist()) == list(range(1000))
    # a block is a multiple of every chunk the loop feeds the jobs: the batch size, a method's own batch
    job = lambda name: SimpleNamespace(method=SimpleNamespace(name=name), options={})  # noqa: E731
    assert block_size(SimpleNamespace(batch_size=64), [job("zeroshot")]) == 64
    assert block_size(SimpleNamespace(batch_size=48), [job("zeroshot"), job("adand")]) == 384  # lcm(48, 128)


def test_merge_run_info_keeps_agreeing_values():
    infos = [{"a": 1, "b": [1, 2], "c": 3}, {"a": 1, "b": [1, 2], "c": 4}, {"a": 1, "b": [1, 2]}]
    assert merge_run_info(infos) == {"a": 1, "b": [1, 2], "c": {"per_rank": [3, 4, None]}}
    assert merge_run_info([{}, {}]) == {}


def test_a_part_is_used_only_when_it_is_the_part_asked_for(tmp_path):
    out = JobOutput(
        positions=np.array([0, 1, 5], np.int64), logits=np.arange(6, dtype=np.float32).reshape(3, 2),
        scores=np.array([0.1, 0.2, 0.3]), noisy=None, reference_scores=None, skipped=[(4, "x.jpg", "broken")],
        seconds=1.5, method_seconds=0.5, peak_memory_mb=12.0, memory_kind="process_peak_rss", run_info={"k": 1},
    )  # fmt: skip
    meta = {"job_id": "j", "rank": 0, "size": 2, "block": 2, "stream": "abc"}
    path = partial_path(tmp_path, "j", 0, 2)
    save_partial(path, out, meta)
    mine = share(7, 0, 2, 2)  # [0, 1, 4, 5]
    back = load_partial(path, meta, mine, 2)
    assert back is not None and back.skipped == out.skipped and back.run_info == {"k": 1} and back.seconds == 1.5
    assert np.array_equal(back.logits, out.logits) and np.array_equal(back.scores, out.scores) and back.noisy is None
    assert load_partial(path, meta, mine, 3) is None  # other classes
    assert load_partial(path, meta, share(9, 0, 2, 2), 2) is None  # other positions (a longer stream)
    for key, value in (("job_id", "k"), ("rank", 1), ("size", 3), ("block", 4), ("stream", "abd")):
        assert load_partial(path, {**meta, key: value}, mine, 2) is None, key
    path.write_bytes(path.read_bytes()[:50])  # a file cut short
    assert load_partial(path, meta, mine, 2) is None
    assert load_partial(tmp_path / "missing.npz", meta, mine, 2) is None
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_world_from_the_torchrun_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_env() is None
    with torchrun_world() as world:
        assert world == World() and not world.distributed and world.gather({"a": 1}) == [{"a": 1}]
        world.barrier()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torchrun_env() == (3, 4, 1)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(DistributedError, match="start a distributed run with torchrun"), torchrun_world():
        pass
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(DistributedError, match="RANK=4"):
        torchrun_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(DistributedError, match="integers"):
        torchrun_env()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match="leave --device out"):
        rank_device("cuda:1", 1)
    assert rank_device("cpu", 1) == "cpu"
    if not torch.cuda.is_available():
        assert rank_device(None, 1) == "cpu"
        with pytest.raises(DistributedError, match="CUDA is not available"):
            rank_device("cuda", 0)


# --------------------------------------------------------------------------- ranks in one process
@pytest.mark.parametrize(
    "suite",
    [
        tiny_suite(),
        tiny_suite(protocol="ood", ood=["textures"], seeds=[0], methods=["zeroshot[score=msp]", "_running"]),
        tiny_suite(protocol="ntta", noisy=["textures"], seeds=[0], datasets=["eurosat"], noisy_fractions=[0.5]),
    ],
    ids=["classification", "ood", "ntta"],
)
def test_ranks_write_the_rows_of_one_process(suite, model, data_root, tmp_path):
    runner(suite, model, data_root, tmp_path / "single").run()
    works = run_ranks(lambda: runner(suite, model, data_root, tmp_path / "ranks"), 3, order=[2, 0, 1])
    assert_same_rows(tmp_path / "single", tmp_path / "ranks")
    rows = ResultStore(tmp_path / "ranks").rows()
    split = {r["method"]: r["config"].get("split_over_ranks") for r in rows}
    assert split == {"zeroshot": 3, "_running": None}
    assert not (tmp_path / "ranks" / "partials").exists()  # rank 0 removed the finished parts
    assert {u.split for u in works[0].units} == {True, False}  # both kinds of unit were there


def test_unreadable_images_are_skipped_by_the_rank_that_has_them(model, tmp_path):
    root = tmp_path / "data"
    make_coop(root, "eurosat", labels=[0, 3, 7], per_class=3, splits=("test",))
    write_corrupt(next(root.rglob("img_1.jpg")))
    suite = tiny_suite(datasets=["eurosat"], seeds=[0])
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        runner(suite, model, root, tmp_path / "single").run()
        run_ranks(lambda: runner(suite, model, root, tmp_path / "ranks"), 2)
    # the same predictions; after the bad image the batches are cut differently than in one process,
    # so logits and metrics agree to float rounding only
    assert_same_rows(tmp_path / "single", tmp_path / "ranks")
    assert {(r["method"], r["n_images"], r["n_skipped"]) for r in ResultStore(tmp_path / "ranks").rows()} == {
        ("zeroshot", 8, 1),
        ("_running", 8, 1),
    }


def test_a_dead_rank_s_parts_are_reused_or_redone(model, data_root, tmp_path):
    suite = tiny_suite(methods=["zeroshot", "_running"], seeds=[0])
    lines: list[str] = []
    runner(suite, model, data_root, tmp_path / "single").run()
    make = lambda: runner(suite, model, data_root, tmp_path / "ranks", log=lines.append)  # noqa: E731
    # rank 1 did its work; rank 0 died before writing anything: no row of a split job yet
    RankWork(make(), 1, 2).run()
    store = ResultStore(tmp_path / "ranks")
    assert not any(r["method"] == "zeroshot" for r in store.rows())
    parts = sorted((tmp_path / "ranks" / "partials").glob("*.rank1of2.npz"))
    assert len(parts) == 2
    parts[0].write_bytes(parts[0].read_bytes()[:100])  # one part cut short (a disk that filled up)
    stale = partial_path(tmp_path / "ranks", store.rows()[0]["job_id"], 0, 3)  # left by a 3-rank run
    stale.write_bytes(b"not a part")
    lines.clear()
    run_ranks(make, 2, order=[1, 0])  # the same command again
    assert sum("reused 1 finished part" in line for line in lines) == 1
    assert_same_rows(tmp_path / "single", tmp_path / "ranks")
    assert len(store.rows()) == 4 and not (tmp_path / "ranks" / "partials").exists()


# --------------------------------------------------------------------------- torchrun
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], target: tuple[str, ...] = (str(WORKER),)) -> list[str]:
    """``torchrun --nproc-per-node 2`` of ``target`` (a script, or ``-m module``) on 127.0.0.1."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), *target, *args]  # fmt: skip


def torchrun_env_vars(**extra) -> dict:
    env = dict(os.environ, **extra)
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the single-process run's kernels
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # 127.0.0.1 only
    return env


def cli_args(suite: Path, data_root, out: Path, cfg_file, cache: Path) -> list[str]:
    return ["bench", "--suite", str(suite), "--data-root", str(data_root), "--out", str(out), "--model", cfg_file,
            "--pretrained", "none", "--no-progress", "--batch-size", "2", "--cache-dir", str(cache)]  # fmt: skip


def test_torchrun_two_ranks_write_the_rows_of_one_process(tmp_path, data_root, cfg_file):
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump(tiny_suite()))
    assert main(cli_args(suite, data_root, tmp_path / "single", cfg_file, tmp_path / "c1")) == 0
    proc = subprocess.run(
        torchrun(cli_args(suite, data_root, tmp_path / "ranks", cfg_file, tmp_path / "c2")),
        capture_output=True, text=True, timeout=600, env=torchrun_env_vars(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 row(s) written, 0 already done, 6 job(s) in 4 pass(es) of shard 0/1 over 2 ranks" in proc.stderr
    assert "[rank 0/2] done:" in proc.stderr and "[rank 1/2] done:" in proc.stderr
    assert_same_rows(tmp_path / "single", tmp_path / "ranks")


def test_torchrun_rank_killed_then_the_command_again(tmp_path, data_root, cfg_file):
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump(tiny_suite(methods=["_pause", "_running"])))
    assert main(cli_args(suite, data_root, tmp_path / "single", cfg_file, tmp_path / "c1")) == 0
    pids = tmp_path / "pids"
    pids.mkdir()
    command = torchrun(cli_args(suite, data_root, tmp_path / "ranks", cfg_file, tmp_path / "c2"))
    env = torchrun_env_vars(BENCH_WORKER_DELAY="0.4", BENCH_WORKER_PIDS=str(pids))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partials = tmp_path / "ranks" / "partials"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(partials.glob("*.rank1of2.npz")):
        time.sleep(0.02)
    os.kill(int((pids / "rank1.pid").read_text()), signal.SIGKILL)  # rank 1, in its second part
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, err[-3000:]
    rows_dir = tmp_path / "ranks" / "rows"
    done = list(rows_dir.glob("*.json")) if rows_dir.exists() else []
    assert len(done) < 6 and all(json.loads(p.read_text())["job_id"] == p.stem for p in done)
    assert list(partials.glob("*.rank1of2.npz"))  # its first part stays, to be reused
    pause_rows = [p for p in done if json.loads(p.read_text())["method"] == "_pause"]
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=torchrun_env_vars())
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{6 - len(done)} row(s) written, {len(done)} already done" in again.stderr
    if not pause_rows:  # (rank 0 may have written the first row from both parts before it was stopped)
        assert "reused 1 finished part(s) of eurosat" in again.stderr
    assert_same_rows(tmp_path / "single", tmp_path / "ranks")
    # no duplicate and no half-written row: one JSON file per job (a killed write leaves a dot-file at most)
    assert len({json.loads(p.read_text())["job_id"] for p in rows_dir.glob("*.json")}) == 6
    assert all(p.suffix == ".json" or p.name.startswith(".") for p in rows_dir.iterdir())


def test_torchrun_generate_splits_the_images_over_ranks(tmp_path):
    from PIL import Image

    from vlm_tta.cache import EmbeddingCache
    from vlm_tta.diffusion import ImageVariations
    from vlm_tta.images import content_hash

    pipe = tiny_models.build_tiny_image_variation_pipeline(seed=0)
    pipe.save_pretrained(tmp_path / "sd")
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    args = ["generate", str(folder), "--diffusion", str(tmp_path / "sd"), "--count", "2", "--steps", "2",
            "--height", "32", "--width", "32", "--jpeg-quality", "0", "--store-size", "0", "--json"]  # fmt: skip
    command = torchrun([*args, "--cache-dir", str(tmp_path / "c2")], target=("-m", "vlm_tta"))
    env = {**torchrun_env_vars(), "OMP_NUM_THREADS": "1"}  # the tiny pipeline's kernels are too small for threads
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                     key=lambda r: r["rank"])  # fmt: skip
    assert [(r["rank"], r["world_size"], r["images"], r["generated"]) for r in reports] == [(0, 2, 3, 6), (1, 2, 2, 4)]
    # the same images as one process makes (up to the float rounding of batched kernels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--cache-dir", str(tmp_path / "c1")]) == 0
    finally:
        torch.set_num_threads(threads)
    hashes = [content_hash(Image.open(folder / f"{i}.png").convert("RGB")) for i in range(5)]
    settings = dict(count=2, steps=2, height=32, width=32, jpeg_quality=None, store_size=None)
    one, two = (
        ImageVariations(tmp_path / "sd", cache=EmbeddingCache(tmp_path / c), **settings).load(hashes)
        for c in ("c1", "c2")
    )
    for a, b in zip(one, two):
        assert a.shape == b.shape == (2, 32, 32, 3) and np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_rank_0_names_the_jobs_whose_parts_it_cannot_find(model, data_root, tmp_path, monkeypatch):
    from vlm_tta.benchmark import distributed

    monkeypatch.setattr(distributed, "PART_WAIT_S", 0.0)
    suite = tiny_suite(datasets=["eurosat"], methods=["zeroshot"], seeds=[0])
    make = lambda: runner(suite, model, data_root, tmp_path / "ranks")  # noqa: E731
    RankWork(make(), 1, 2).run()  # rank 0's part never comes (e.g. --out not shared between the nodes)
    with pytest.raises(BenchmarkError, match=r"1 job\(s\) split over the ranks have a missing .* eurosat zeroshot"):
        RankWork(make(), 0, 2).finish()
    assert len(list((tmp_path / "ranks" / "partials").glob("*.npz"))) == 1  # kept for the next run
