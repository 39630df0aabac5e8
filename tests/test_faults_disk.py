"""Fault matrix, disk tier: a broken or hostile filesystem around a running engine.

Each test drives one fault against a real filesystem (and, where it needs them, real processes:
a writer killed mid-run, a second user, a small tmpfs for a full disk) and checks what the issue
asks of every fault: the engine call returns (a hang fails the test through a watchdog, never a
timed assertion), no wrong bytes are served, the right counter moved, one clear log line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import BLOCK, block_payload
from watchdog import returns

from xconnector import Engine, native

BLOCK_BYTES = 256
HEADER = 64  # disk_tier::HEADER
FILE = HEADER + BLOCK_BYTES


def engine(disk: Path, memory_blocks: int = 4, disk_blocks: int = 1000, **kw: object) -> Engine:
    return Engine(
        block_bytes=BLOCK_BYTES,
        capacity_bytes=memory_blocks * BLOCK_BYTES,
        block_size=BLOCK,
        model="fault-matrix",
        disk_path=str(disk),
        disk_capacity_bytes=disk_blocks * FILE,
        **kw,  # type: ignore[arg-type]
    )


def space(disk: Path, **kw: object) -> Path:
    """The subtree of the engine `engine(disk, **kw)` would make: one per engine namespace."""
    ns = Engine(
        block_bytes=BLOCK_BYTES,
        capacity_bytes=BLOCK_BYTES,
        block_size=BLOCK,
        model="fault-matrix",
        **kw,
    )  # type: ignore[arg-type]
    return disk / f"{ns.namespace:016x}"


def block_file(disk: Path, e: Engine, tokens: list[int], i: int) -> Path:
    h = native().sequence_hashes(tokens, BLOCK)[i]
    return disk / f"{e.namespace:016x}" / f"{h >> 56:02x}" / f"{e.namespace:016x}-{h:016x}.xcb"


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def only_on_disk(disk: Path, tokens: list[int], **kw: object) -> Engine:
    """An engine whose memory no longer holds `tokens` (evicted by another prompt) while its
    disk tier does."""
    e = engine(disk, memory_blocks=4, **kw)
    assert e.store(tokens, block_payload(tokens)) == len(tokens) // BLOCK
    assert e.flush(30)
    other = list(range(90_000, 90_000 + 4 * BLOCK))
    e.store(other, block_payload(other))
    assert e.flush(30)
    assert e.stats()["promoted_blocks"] == 0
    return e


def _fifo(p: Path, scratch: Path) -> None:
    os.mkfifo(p)


def _link_to_fifo(p: Path, scratch: Path) -> None:
    os.mkfifo(scratch / "fifo")
    os.symlink(scratch / "fifo", p)


def _link_to_good_block(p: Path, scratch: Path) -> None:
    # The link points at a regular file of exactly the right size: only O_NOFOLLOW refuses it.
    target = scratch / "block"
    shutil.copyfile(p.with_name(p.name + ".orig"), target)
    os.symlink(target, p)


def _directory(p: Path, scratch: Path) -> None:
    p.mkdir()


def _endless(p: Path, scratch: Path) -> None:
    # Bigger than a block file: read no more than the index expects (here: refused by size).
    p.write_bytes(p.with_name(p.name + ".orig").read_bytes() + b"\0" * (1 << 20))


@pytest.mark.parametrize(
    "plant",
    [_fifo, _link_to_fifo, _link_to_good_block, _directory, _endless],
    ids=lambda f: f.__name__[1:],
)
def test_a_special_file_at_an_indexed_block_path_is_a_miss_not_a_hang(
    tmp_path: Path, plant: Callable[[Path, Path], None], logs: pytest.LogCaptureFixture
) -> None:
    disk, scratch = tmp_path / "kv", tmp_path / "scratch"
    scratch.mkdir()
    tokens = list(range(1000, 1000 + 3 * BLOCK))
    e = only_on_disk(disk, tokens)
    victim = block_file(disk, e, tokens, 1)
    victim.rename(victim.with_name(victim.name + ".orig"))
    plant(victim, scratch)

    out = bytearray(3 * BLOCK_BYTES)
    n = returns(lambda: e.load(tokens, out), "load() with a special file at a block path")
    # Block 0 comes from disk; block 1 is refused, so the prefix ends there.
    assert n == BLOCK
    assert bytes(out[:BLOCK_BYTES]) == block_payload(tokens)[:BLOCK_BYTES]
    s = e.stats()
    assert s["disk_corrupt_blocks"] == 1, s
    assert len(lines(logs, "disk-tier block removed")) == 1, logs.text
    # The next lookup stops at block 1 and does not hang either.
    assert returns(lambda: e.lookup(tokens), "lookup()") == BLOCK


def test_a_fifo_left_at_a_block_path_is_removed_at_start(tmp_path: Path) -> None:
    disk = tmp_path / "kv"
    tokens = list(range(2000, 2000 + 2 * BLOCK))
    e = only_on_disk(disk, tokens)
    victim = block_file(disk, e, tokens, 1)
    del e
    victim.unlink()
    os.mkfifo(victim)
    fresh = returns(lambda: engine(disk), "opening the tier over a FIFO")
    s = fresh.stats()
    assert s["disk_leftover_files"] == 1 and not victim.exists(), s
    assert returns(lambda: fresh.lookup(tokens), "lookup()") == BLOCK


# -- 2. the directory is trusted only when nobody else can write to it ---------------------------


def refused(e: Engine, disk: Path, logs: pytest.LogCaptureFixture) -> None:
    """The engine works without its disk tier, wrote nothing there, and said why once."""
    tokens = list(range(3000, 3000 + 2 * BLOCK))
    assert e.store(tokens, block_payload(tokens)) == 2
    assert e.flush(30)
    out = bytearray(2 * BLOCK_BYTES)
    assert e.load(tokens, out) == 2 * BLOCK and bytes(out) == block_payload(tokens)
    s = e.stats()
    assert s["disk_refused"] == 1 and "disk_entries" not in s, s
    assert not any(p.name.endswith(".xcb") for p in disk.rglob("*"))
    said = [r for r in logs.records if "disk tier off" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.ERROR, logs.text
    assert str(disk) in said[0].getMessage() and "local_disk_shared" in said[0].getMessage()


def test_a_new_directory_is_private(tmp_path: Path) -> None:
    disk = tmp_path / "new" / "kv"
    e = engine(disk)
    tokens = list(range(BLOCK))
    e.store(tokens, block_payload(tokens))
    assert e.flush(30)
    assert stat.S_IMODE(disk.stat().st_mode) == 0o700
    files = [p for p in disk.rglob("*")]
    assert files and all(stat.S_IMODE(p.stat().st_mode) in (0o700, 0o600) for p in files)
    assert e.stats()["disk_refused"] == 0


@pytest.mark.parametrize("where", ["top", "subdirectory"])
def test_a_directory_others_can_write_to_is_refused(
    tmp_path: Path, where: str, logs: pytest.LogCaptureFixture
) -> None:
    disk = tmp_path / "kv"
    disk.mkdir(mode=0o700)
    bad = disk if where == "top" else space(disk) / "ab"
    bad.mkdir(parents=True, exist_ok=True)
    bad.chmod(0o777)  # what a pre-existing world-writable directory looks like
    e = engine(disk)
    refused(e, disk, logs)
    assert stat.S_IMODE(bad.stat().st_mode) == 0o777, "a refused directory is left as found"
    assert "0777" in logs.text


def test_a_group_writable_directory_is_used_when_the_config_says_shared(tmp_path: Path) -> None:
    disk = tmp_path / "kv"
    disk.mkdir()
    disk.chmod(0o770)
    e = engine(disk, disk_shared=True)
    tokens = list(range(BLOCK))
    e.store(tokens, block_payload(tokens))
    assert e.flush(30)
    s = e.stats()
    assert s["disk_refused"] == 0 and s["disk_written_blocks"] == 1
    f = next(disk.rglob("*.xcb"))
    assert (
        stat.S_IMODE(f.stat().st_mode) == 0o640 and stat.S_IMODE(f.parent.stat().st_mode) == 0o770
    )


def test_a_symbolic_link_inside_the_tier_is_refused(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    disk, elsewhere = tmp_path / "kv", tmp_path / "elsewhere"
    disk.mkdir(mode=0o700)
    elsewhere.mkdir(mode=0o700)
    space(disk).mkdir(mode=0o700)
    (space(disk) / "ab").symlink_to(elsewhere)
    refused(engine(disk), disk, logs)


root_only = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to create files as another uid"
)
NOBODY = 65534


@root_only
def test_a_directory_owned_by_another_user_is_refused(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    disk = tmp_path / "kv"
    disk.mkdir(mode=0o700)
    os.chown(disk, NOBODY, NOBODY)
    refused(engine(disk), disk, logs)
    assert f"uid {NOBODY}" in logs.text


@root_only
def test_another_user_cannot_read_or_plant_blocks(tmp_path: Path) -> None:
    """A real second user (uid 65534, in a child process) against a private tier directory."""
    tmp_path.chmod(0o755)
    disk = tmp_path / "kv"
    tokens = list(range(4000, 4000 + BLOCK))
    e = engine(disk)
    e.store(tokens, block_payload(tokens))
    assert e.flush(30)
    target = block_file(disk, e, tokens, 0)
    code = (
        "import os, sys, json\n"
        f"os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "out = {}\n"
        "for what, fn in [('read', lambda: open(sys.argv[1], 'rb').read()),\n"
        "                 ('list', lambda: os.listdir(sys.argv[2])),\n"
        "                 ('plant', lambda: open(os.path.join(sys.argv[2], 'x.xcb'), 'wb'))]:\n"
        "    try:\n"
        "        fn(); out[what] = 'allowed'\n"
        "    except PermissionError:\n"
        "        out[what] = 'denied'\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(target), str(disk)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"read": "denied", "list": "denied", "plant": "denied"}


# -- 3. a full filesystem ------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs mounted for the test (needs CAP_SYS_ADMIN, which root in this
    project's CI has)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_filesystem_evicts_and_degrades_instead_of_switching_the_tier_off(
    small_fs: Path, logs: pytest.LogCaptureFixture
) -> None:
    disk = small_fs / "kv"
    bb = 4096 - HEADER  # one tmpfs page per block file
    # Budget: 64 MiB of blocks on a 1 MiB filesystem. Another program holds most of it.
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (700 << 10))

    def make() -> Engine:
        return Engine(
            block_bytes=bb,
            capacity_bytes=8 * bb,
            block_size=BLOCK,
            model="fault-matrix",
            disk_path=str(disk),
            disk_capacity_bytes=64 << 20,
        )

    e = make()
    prompts = [list(range(p * 1000, p * 1000 + 4 * BLOCK)) for p in range(300)]
    for t in prompts:
        assert returns(lambda t=t: e.store(t, block_payload(t, bb)), "store()") == 4
        assert e.flush(30)
    s = e.stats()
    # Far more blocks were written than the filesystem holds (256 pages): the tier kept working
    # by evicting its own.
    assert s["disk_written_blocks"] == 4 * len(prompts) > 2 * 256, s
    assert s["disk_full_episodes"] == 1 and s["disk_write_errors"] >= 1, s
    assert s["disk_budget_bytes"] < s["disk_capacity_bytes"], s
    # The budget counts exactly what is on disk: evictions, failed writes and retries included.
    assert s["disk_used_bytes"] == sum(f.stat().st_size for f in disk.rglob("*.xcb")), s
    full = lines(logs, "filesystem is full")
    assert len(full) == 1, logs.text
    assert not [
        r for r in logs.records if r.levelno >= logging.WARNING and r.getMessage() not in full
    ], logs.text
    # What it holds is right: the latest prompt comes back from disk, byte for byte.
    last = prompts[-1]
    fresh = make()
    out = bytearray(4 * bb)
    n = fresh.load(last, out)
    assert n == 4 * BLOCK and bytes(out) == block_payload(last, bb)
    del fresh

    # The other program frees its space: the budget climbs back, and that is said once.
    filler.unlink()
    for p in range(300, 300 + 64 * 4):
        t = list(range(p * 1000, p * 1000 + BLOCK))
        e.store(t, block_payload(t, bb))
        assert e.flush(30)
        if e.stats()["disk_budget_bytes"] > (700 << 10):
            break
    s = e.stats()
    assert s["disk_budget_bytes"] > (700 << 10), s
    assert s["disk_full_episodes"] >= 1


# -- 4. what a crash leaves ----------------------------------------------------------------------

CRASHING_WRITER = """
import os, sys
sys.path.insert(0, sys.argv[2])
from conftest import block_payload
from xconnector import Engine
e = Engine(block_bytes=256, capacity_bytes=4 * 256, block_size=16, model="fault-matrix",
           disk_path=sys.argv[1], disk_capacity_bytes=1000 * 320)
for p in range(200):
    t = list(range(p * 1000, p * 1000 + 64))
    e.store(t, block_payload(t))
    if p == 100:
        print("ready", flush=True)
e.flush(30)
print("done", flush=True)
os.kill(os.getpid(), 9)
"""


def test_crash_leftovers_are_removed_and_counted_at_start(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    disk = tmp_path / "kv"
    # A real writer process, killed with SIGKILL (nothing of it runs after that).
    p = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, str(disk), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = p.communicate(timeout=120)
    assert "ready" in out and p.returncode == -signal.SIGKILL, out
    # What a crash or a power loss mid-write leaves, besides the writer's own files: a temporary
    # file of the dead writer, a block file cut short, one with garbage past its end.
    blocks = sorted(disk.rglob("*.xcb"))
    assert len(blocks) > 3
    sub = blocks[0].parent
    (sub / f".tmp-{p.pid}-1234-7").write_bytes(b"\1" * 100)
    with open(blocks[1], "r+b") as f:
        f.truncate(FILE // 2)
    with open(blocks[2], "ab") as f:
        f.write(b"\0" * 10)
    # Another engine's block size sharing the directory: a whole, valid file of another size.
    other = blocks[3].read_bytes()
    other_size = bytearray(other[:HEADER] + other[HEADER:] * 2)
    other_size[24:32] = (2 * BLOCK_BYTES).to_bytes(8, "little")
    other_path = blocks[3].with_name("00000000000000ff-00000000000000ff.xcb")
    other_path.write_bytes(bytes(other_size))

    expected_leftovers = sum(
        1
        for f in disk.rglob("*")
        if f.is_file()
        and (f.name.startswith(".tmp-") or f.stat().st_size not in (FILE, len(other_size)))
    )
    e = returns(lambda: engine(disk), "opening the tier after a crash")
    s = e.stats()
    assert s["disk_leftover_files"] == expected_leftovers >= 3, s
    assert other_path.exists(), "another block size's valid file is not ours to remove"
    on_disk = sum(f.stat().st_size for f in disk.rglob("*.xcb") if f != other_path)
    assert not list(disk.rglob(".tmp-*"))
    assert s["disk_used_bytes"] == on_disk, (s, on_disk)
    said = lines(logs, "left by a crash")
    assert len(said) == 1, logs.text
    # Every block still indexed is served right.
    for q in range(200):
        t = list(range(q * 1000, q * 1000 + 64))
        out = bytearray(4 * BLOCK_BYTES)
        n = e.load(t, out)
        assert (
            bytes(out[: n // BLOCK * BLOCK_BYTES]) == block_payload(t)[: n // BLOCK * BLOCK_BYTES]
        )


def test_a_live_writers_temporary_file_is_left_alone(tmp_path: Path) -> None:
    disk = tmp_path / "kv"
    engine(disk)  # creates the directory
    sub = space(disk) / "ab"
    sub.mkdir(mode=0o700)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp = sub / f".tmp-{live.pid}-99-1"
        tmp.write_bytes(b"\1" * 10)
        e = engine(disk)
        assert e.stats()["disk_leftover_files"] == 0 and tmp.exists()
    finally:
        live.kill()
        live.wait()


def test_the_yaml_says_shared_with_local_disk_shared(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    from xconnector.adapters.lmcache import LMCacheAdapter
    from xconnector.sdk import XConnectorSDK

    disk = tmp_path / "kv"
    disk.mkdir()
    disk.chmod(0o770)

    def stats(settings: dict[str, object]) -> dict[str, object]:
        sdk = XConnectorSDK(
            {"adapters": [{"name": "lmcache", "config": {"local_disk": str(disk), **settings}}]}
        )
        sdk.initialize()
        adapter = sdk.get_adapter("lmcache")
        assert isinstance(adapter, LMCacheAdapter)
        engine = adapter.engine_for(
            kv_block_size=16, kv_block_bytes=256, model="m", dtype="f16", kv_layout="NHD"
        )
        s: dict[str, object] = engine.stats()
        sdk.shutdown()
        return s

    assert stats({})["disk_refused"] == 1
    assert len(lines(logs, "disk tier off")) == 1
    assert stats({"local_disk_shared": True})["disk_refused"] == 0


def test_world_writable_is_refused_even_when_shared(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    disk = tmp_path / "kv"
    disk.mkdir()
    disk.chmod(0o777)
    refused(engine(disk, disk_shared=True), disk, logs)


def test_a_parent_every_user_can_write_to_is_refused(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    # Whoever can rename entries of the parent could swap the directory after it was checked.
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)
    disk = parent / "kv"
    refused(engine(disk), disk, logs)
    assert "its parent" in logs.text


def test_engines_sharing_a_directory_keep_their_own_blocks(tmp_path: Path) -> None:
    """Two tensor-parallel ranks with one local_disk: a restart of one (or its budget) never
    deletes the other's blocks."""
    disk = tmp_path / "kv"
    tokens = list(range(5000, 5000 + 4 * BLOCK))
    rank0, rank1 = (engine(disk, disk_blocks=4, tp_world_size=2, tp_rank=r) for r in (0, 1))
    for e in (rank0, rank1):
        e.store(tokens, block_payload(tokens))
        assert e.flush(30)
    del rank0
    small = engine(disk, disk_blocks=2, tp_world_size=2, tp_rank=0)  # restarted with less room
    assert small.stats()["disk_entries"] == 2
    fresh1 = engine(disk, disk_blocks=4, tp_world_size=2, tp_rank=1)
    out = bytearray(4 * BLOCK_BYTES)
    assert fresh1.load(tokens, out) == 4 * BLOCK and bytes(out) == block_payload(tokens)


def test_a_disk_budget_smaller_than_a_block_is_a_config_error(tmp_path: Path) -> None:
    from xconnector.exceptions import ConfigError

    with pytest.raises(ConfigError, match="disk_capacity_bytes"):
        Engine(block_bytes=BLOCK_BYTES, capacity_bytes=BLOCK_BYTES, disk_path=str(tmp_path / "kv"))


OUT_OF_DESCRIPTORS = """
import json, os, resource, sys
sys.path.insert(0, sys.argv[2])
from conftest import block_payload
from xconnector import Engine
e = Engine(block_bytes=256, capacity_bytes=4 * 256, block_size=16, model="fault-matrix",
           disk_path=sys.argv[1], disk_capacity_bytes=1000 * 320)
t = list(range(16 * 4))
e.store(t, block_payload(t)); assert e.flush(30)
o = list(range(9000, 9000 + 64)); e.store(o, block_payload(o)); assert e.flush(30)
before = sum(1 for _ in os.scandir(sys.argv[1]) for _ in [0])
files = [f for f in __import__("pathlib").Path(sys.argv[1]).rglob("*.xcb")]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
held = []
try:
    while True:
        held.append(open(os.devnull))
except OSError:
    pass
out = bytearray(4 * 256)
n = e.load(t, out)
for f in held:
    f.close()
print(json.dumps({"n": n, "files": len(files),
                  "after": len(list(__import__("pathlib").Path(sys.argv[1]).rglob("*.xcb"))),
                  "corrupt": e.stats()["disk_corrupt_blocks"]}))
"""


def test_running_out_of_file_descriptors_is_a_miss_that_deletes_nothing(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            OUT_OF_DESCRIPTORS,
            str(tmp_path / "kv"),
            str(Path(__file__).parent),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["n"] == 0 and got["corrupt"] == 0 and got["after"] == got["files"] == 8, got
