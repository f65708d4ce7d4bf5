"""The shared cache of loaded samples (`cache_bytes`), with real worker processes, real shared memory and
real JPEGs decoded with Pillow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import cache_sources
import numpy as np
import psutil
import pytest
from conftest import shm_entries

import mpfeed
from mpfeed.cache import READY, WRITING, Cache, overhead_bytes
from mpfeed.layout import Encoder, flatten

N = 24
SEED = 7
JPEGS = cache_sources.make_jpegs(N)
HANG_BOUND_S = 60


def expected(epochs: int, indices=range(N)) -> list[dict[int, tuple]]:
    """What any feeder must serve: augment(load(i), rng(seed, epoch, i)), made here in one process."""
    source = cache_sources.Jpegs(JPEGS)
    return [
        {
            i: _plain(source.augment(source.load(i), np.random.default_rng(mpfeed.element_seed(SEED, e, i))))
            for i in indices
        }
        for e in range(epochs)
    ]


def _plain(element: tuple) -> tuple:
    image, label, name = element
    return np.array(image).tobytes(), int(label), str(name)


def served(feeder: mpfeed.Feeder, epochs: int) -> list[dict[int, tuple]]:
    """Each epoch's elements by label (batches split), with a check that none comes twice."""
    result = []
    for _ in range(epochs):
        epoch: dict[int, tuple] = {}
        for element in feeder:
            rows = zip(*element) if feeder._consumer.supervisor.config.batch_size else [element]
            for image, label, name in rows:
                assert int(label) not in epoch
                epoch[int(label)] = _plain((image, label, name))
        result.append(epoch)
    return result


def record_bytes(index: int) -> int:
    return Encoder().prepare([flatten(cache_sources.Jpegs(JPEGS).load(index))], index, False).nbytes


def cache_pss(pids) -> int:
    """The cache's proportional share of resident memory, summed over the processes that map it."""
    total = 0
    for pid in pids:
        inside = False
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                fields = line.split()
                if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                    inside = "mpfeed-cache-" in line
                elif inside and fields[0] == "Pss:":
                    total += int(fields[1]) * 1024
    return total


def cache_fds_and_maps() -> list[str]:
    """The consumer's own ways into any cache: open fds and mappings."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "mpfeed-cache-" in os.readlink(f"/proc/self/fd/{fd}"):
                found.append(f"fd {fd}")
        except OSError:
            pass
    with open("/proc/self/maps") as maps:
        found += [line for line in maps if "mpfeed-cache-" in line]
    return found


@pytest.mark.parametrize(
    "options",
    [dict(shuffle=True), dict(shuffle=True, batch_size=5, ordered=False)],
    ids=["shuffled", "batched-first-ready"],
)
def test_the_cache_changes_nothing_served_over_three_epochs(options):
    want = expected(3)
    for cache_bytes in (None, 4 << 20):
        source = cache_sources.Jpegs(JPEGS)
        with mpfeed.Feeder(source, workers=2, seed=SEED, cache_bytes=cache_bytes, **options) as feeder:
            assert served(feeder, 3) == want, f"cache_bytes={cache_bytes}"


def test_load_runs_once_per_element_across_epochs_when_everything_fits(tmp_path):
    log = tmp_path / "loads"
    source = cache_sources.Jpegs(JPEGS, log=str(log))
    with mpfeed.Feeder(source, workers=2, seed=SEED, shuffle=True, cache_bytes=4 << 20) as feeder:
        assert served(feeder, 3) == expected(3)
        loads = log.read_text().split("\n")[:-1]
        stats = feeder.stats()
        report = feeder.report()
    assert sorted(int(line.split()[0]) for line in loads) == list(range(N))
    assert len({line.split()[1] for line in loads}) == 2, "both workers loaded and stored samples"
    assert (stats.cache_misses, stats.cache_hits, stats.cache_entries) == (N, 2 * N, N)
    assert stats.cache_bytes <= stats.cache_budget == 4 << 20
    assert f"served {2 * N} of {3 * N} samples from memory" in report
    assert f"it holds {N} of the {N} samples it serves" in report
    assert not cache_fds_and_maps(), "close() lets go of the cache"


def test_a_cache_too_small_never_grows_past_its_budget_and_says_how_much_more_would_do(tmp_path):
    log = tmp_path / "loads"
    sizes = [record_bytes(i) for i in range(N)]
    budget = overhead_bytes(N, 2) + sum(sizes) // 2
    want = expected(3)
    source = cache_sources.Jpegs(JPEGS, log=str(log))
    with mpfeed.Feeder(source, workers=2, seed=SEED, shuffle=True, cache_bytes=budget) as feeder:
        pids = [os.getpid()] + [w.pid for w in feeder.stats().workers]
        for epoch in range(3):
            assert served(feeder, 1)[0] == want[epoch]
            stats = feeder.stats()
            assert stats.cache_bytes <= budget
            assert cache_pss(pids) <= budget
        report = feeder.report()
    held = stats.cache_entries
    assert N // 2 - 2 <= held < N
    assert len(log.read_text().split("\n")[:-1]) == N + 2 * (N - held), "what did not fit, loaded each epoch"
    more = overhead_bytes(N, 2) + sum(sizes) - budget
    assert f"{N - held} did not fit and are loaded again every epoch" in report
    assert f"About {more / 2**20:,.1f} MiB more" in report


def _attach_and_run(cache: Cache, slot: int, body: str) -> subprocess.Popen:
    """A process of its own that attaches ``cache`` (as a worker does) and runs ``body`` with it."""
    spec = cache.spec(slot)
    code = textwrap.dedent(
        f"""
        import cache_sources, numpy as np
        from mpfeed.cache import Cache
        from mpfeed.protocol import CacheSpec
        cache = Cache.attach(CacheSpec({spec.name!r}, {spec.size}, {spec.slot}))
        """
    ) + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)


def test_an_entry_whose_writer_was_killed_is_never_read_and_is_written_again():
    cache = Cache.create(1 << 20, N, 3)
    try:
        killed = _attach_and_run(cache, 0, 'cache.put(5, cache_sources.in_write("killed"))')
        assert killed.wait(HANG_BOUND_S) == -signal.SIGKILL
        killed.stdout.close()
        assert int(cache._index[5, 0]) == WRITING, "killed inside the write window"
        assert cache.get(5) is None and cache.summary().entries == 0
        again = _attach_and_run(
            cache,
            1,
            """
            assert cache.get(5) is None
            sample = {"image": np.full((48, 64, 3), 9, np.uint8), "label": 5, "name": "again"}
            stored = cache.put(5, sample)
            assert stored["image"].flags.writeable is False and stored["name"] == "again"
            print("stored", flush=True)
            """,
        )
        assert again.communicate(timeout=HANG_BOUND_S)[0] == "stored\n"
        element = cache.get(5)
        assert int(cache._index[5, 0]) == READY
        assert (element["image"] == 9).all() and element["label"] == 5 and element["name"] == "again"
        assert cache.summary().entries == 1
    finally:
        cache.close()


def test_a_live_writer_keeps_its_entry_until_it_dies():
    cache = Cache.create(1 << 20, N, 2)
    stalled = _attach_and_run(cache, 0, 'cache.put(3, cache_sources.in_write("stalled"))')
    try:
        assert stalled.stdout.readline() == "writing\n"
        sample = {"image": np.ones((48, 64, 3), np.uint8), "label": 3, "name": "mine"}
        assert cache.put(3, sample) is None, "a live writer's entry is not taken over"
        assert cache.get(3) is None
        stalled.kill()
        stalled.wait(HANG_BOUND_S)
        assert cache.put(3, sample)["name"] == "mine"
        assert cache.get(3)["name"] == "mine"
    finally:
        stalled.kill()
        stalled.wait()
        stalled.stdout.close()
        cache.close()


def test_a_worker_killed_while_writing_to_the_cache_is_reported_with_its_element():
    source = cache_sources.KilledMidWrite(JPEGS, victim=5)
    with mpfeed.Feeder(source, workers=2, seed=SEED, cache_bytes=4 << 20) as feeder:
        with pytest.raises(mpfeed.WorkerDiedError, match=r"killed by SIGKILL \(-9\)"):
            for _ in feeder:
                pass


def test_resume_with_a_cache_continues_exactly_where_the_state_was_saved():
    want = expected(2)
    options = dict(workers=2, seed=SEED, shuffle=True, cache_bytes=4 << 20)
    with mpfeed.Feeder(cache_sources.Jpegs(JPEGS), **options) as feeder:
        assert served(feeder, 1)[0] == want[0]
        iterator = iter(feeder)
        first = [_plain(next(iterator)) for _ in range(7)]
        state = feeder.state_dict()
        del iterator
        feeder.load_state_dict(state)  # again on the same feeder: every sample is cached by now
        rest = [_plain(element) for element in feeder]
        assert feeder.stats().cache_misses == N
    assert {element[1]: element for element in first + rest} == want[1]
    with mpfeed.Feeder(cache_sources.Jpegs(JPEGS), **options) as fresh:
        fresh.load_state_dict(state)
        elsewhere = [_plain(element) for element in fresh]
    assert elsewhere == rest


def test_partitions_each_with_its_cache_serve_what_one_feeder_without_would():
    want = expected(2)
    options = dict(workers=1, seed=SEED, shuffle=True, cache_bytes=2 << 20)
    parts = [mpfeed.Feeder(cache_sources.Jpegs(JPEGS), partition=(p, 2), **options) for p in range(2)]
    seen: list[set] = [set(), set()]
    try:
        for epoch in range(2):
            halves = [served(part, 1)[0] for part in parts]
            assert not halves[0].keys() & halves[1].keys()
            assert {**halves[0], **halves[1]} == want[epoch]
            for part, half in zip(seen, halves):
                part.update(half)
        # Each epoch's permutation is cut into parts anew, so a part's cache holds what it met in any epoch.
        assert [part.stats().cache_entries for part in parts] == [len(part) for part in seen]
        assert all(N // 2 < len(part) < N for part in seen)
    finally:
        for part in parts:
            part.close()


def test_a_worker_started_later_maps_the_cache_and_loads_nothing_again(tmp_path):
    log = tmp_path / "loads"
    source = cache_sources.Jpegs(JPEGS, log=str(log))
    with mpfeed.Feeder(source, workers="auto", max_workers=4, seed=SEED, cache_bytes=4 << 20) as feeder:
        served(feeder, 1)
        feeder._consumer.supervisor.add_workers(1)
        later = feeder.stats().workers[-1].pid
        deadline = time.monotonic() + HANG_BOUND_S
        while not _maps_cache(later):  # it maps the cache as it starts, before it takes any task
            assert time.monotonic() < deadline, "the later worker never mapped the cache"
            time.sleep(0.05)
        assert served(feeder, 2) == expected(3)[1:]
    assert len(log.read_text().split("\n")[:-1]) == N


def _maps_cache(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return any("mpfeed-cache-" in line for line in maps)


_CONSUMER = """
    import sys, time, cache_sources, mpfeed
    source = cache_sources.Jpegs(cache_sources.make_jpegs(24))
    feeder = mpfeed.Feeder(source, workers=2, cache_bytes=4 << 20)
    for _ in range(2):
        for element in feeder:
            pass
    print(" ".join(str(w.pid) for w in feeder.stats().workers), feeder.stats().cache_entries, flush=True)
    time.sleep(120)
"""


def test_sigkill_of_the_whole_group_with_a_cache_leaves_nothing():
    before = shm_entries()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    consumer = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CONSUMER)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        *pids, entries = consumer.stdout.readline().split()
        assert len(pids) == 2 and int(entries) == 24
        workers = [psutil.Process(int(pid)) for pid in pids]
        os.killpg(consumer.pid, signal.SIGKILL)
        consumer.wait(HANG_BOUND_S)
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive
        assert not shm_entries() - before
    finally:
        consumer.kill()
        consumer.wait()
        consumer.stdout.close()


def _numbers(n, shard):
    yield from range(shard.index, n, shard.count)


@pytest.mark.parametrize(
    "source, options, message",
    [
        ([1, 2, 3], dict(cache_bytes=1 << 20), "needs a random-access source that splits loading"),
        (cache_sources.Jpegs(JPEGS), dict(cache_bytes=0), "cache_bytes must be positive bytes"),
        (cache_sources.Jpegs(JPEGS), dict(cache_bytes=64), "too small: the cache's index"),
        (cache_sources.Jpegs(JPEGS), dict(cache_bytes=1 << 60), "more than the .* bytes of memory available"),
        (cache_sources.Jpegs(JPEGS), dict(cache_bytes=1 << 20, backend=mpfeed.RayBackend()), "Ray backend"),
    ],
    ids=["getitem-only", "zero", "index-too-big", "beyond-memory", "ray"],
)
def test_a_cache_that_cannot_work_is_refused_before_any_worker_starts(source, options, message):
    with pytest.raises((ValueError, mpfeed.ShmSpaceError), match=message):
        mpfeed.Feeder(source, workers=1, **options)


def test_stats_keep_the_cache_figures_after_close():
    with mpfeed.Feeder(cache_sources.Jpegs(JPEGS), workers=1, seed=SEED, cache_bytes=4 << 20) as feeder:
        served(feeder, 2)
    stats = feeder.stats()
    assert (stats.cache_hits, stats.cache_misses, stats.cache_entries) == (N, N, N)


def test_a_sample_the_cache_cannot_hold_is_an_error_naming_load_and_the_element():
    with mpfeed.Feeder(cache_sources.LoadsObjects(JPEGS), workers=1, cache_bytes=4 << 20) as feeder:
        with pytest.raises(mpfeed.SourceError, match=r"load\(0\) returned a sample the cache cannot hold"):
            next(iter(feeder))


def test_a_cached_feeder_feeds_tf_data_the_same_epochs():
    pytest.importorskip("tensorflow")
    options = dict(workers=2, seed=SEED, shuffle=True, batch_size=4, cache_bytes=4 << 20)
    with mpfeed.Feeder(cache_sources.Jpegs(JPEGS), **options) as feeder:
        dataset = feeder.dataset()
        for want in expected(2):
            got = {}
            for images, labels, names in dataset:
                for image, label, name in zip(images.numpy(), labels.numpy(), names.numpy()):
                    got[int(label)] = _plain((image, label, name.decode()))
            assert got == want
        assert feeder.stats().cache_hits == N
