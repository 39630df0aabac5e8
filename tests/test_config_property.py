"""For generated configs: `xconnector check-config` says valid (for the worker's block size, on
this machine) if and only if the SDK a worker builds from it initializes and its first KV call
works (v0 KV tensors of the worker's block size, stored, then loaded into other blocks and
compared byte for byte). Redis is a real server on loopback; the disk directories are real.

The KV here is small (2 layers, 2 heads of 8): a memory budget the validator accepts can still
hold no engine block of a large model, which only the worker's KV tensors reveal (the engine
says so once when it is built, and XConnector stays off)."""

from __future__ import annotations

import io
import itertools
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from services import RedisServer

from xconnector.cli import check_config
from xconnector.config.discovery import load_config_file
from xconnector.exceptions import ConfigError, XConnectorError
from xconnector.sdk import XConnectorSDK

HEADS, HEAD_DIM, LAYERS = 2, 8, 2  # no dimension equal to a block size: layout is unambiguous
KEY_SET, KEY_UNSET = "XC_PROPERTY_AUTH_KEY", "XC_PROPERTY_AUTH_KEY_UNSET"
ABSENT = object()

# Placeholders, replaced per example: a real Redis (and one with a password, given a wrong one), a
# port nothing listens on, a fresh directory, a directory that cannot be created (under a file).
LMCACHE_CHOICES: dict[str, list[Any]] = {
    "storage_backend": ["memory", "disk", "redis", "hybrid"],
    "chunk_size": [16, 24, 32, 48, 64, 64],
    "max_cache_size": ["1KB", "200KiB", "256KiB", 64, "64MiB"],
    "local_cpu": [True, False],
    "local_disk": ["<fresh dir>", "<under a file>"],
    "remote_url": ["<redis>", "<redis, wrong password>", "redis://127.0.0.1:1"],
    "remote_auth_key_env": [KEY_SET, KEY_UNSET],
}


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    # Each setting is mostly absent, and the settings that go together (hybrid mode and a Redis
    # URL, a disk backend and a directory) mostly come together, so both outcomes are common.
    lmcache = {}
    for key, values in LMCACHE_CHOICES.items():
        value = draw(st.sampled_from([ABSENT, ABSENT, ABSENT, *values]))
        if value is not ABSENT:
            lmcache[key] = value
    adapters = [{"name": "lmcache", "config": lmcache}]
    section: dict[str, Any] = {"enabled": True, "adapters": adapters}
    if draw(st.integers(0, 4)) > 0:  # consistent tiers, four times in five
        shared = "remote_url" in lmcache
        if shared:
            section["mode"] = "hybrid"
        elif lmcache.get("storage_backend") in ("redis", "hybrid"):
            del lmcache["storage_backend"]
        if lmcache.get("storage_backend") in ("disk", "hybrid"):
            lmcache.setdefault("local_disk", "<fresh dir>")
        if lmcache.get("local_cpu") is False:
            del lmcache["local_cpu"]
    for key, values in {
        "mode": ["embedded", "hybrid"],
        "enable_distributed": [True, False],
        "performance": [{"block_size": 16}, {"block_size": 32}],
    }.items():
        value = draw(st.sampled_from([ABSENT, ABSENT, ABSENT, *values]))
        if value is not ABSENT and key not in section:
            section[key] = value
    return {
        "block": draw(st.sampled_from([16, 32])),
        # Where the worker's block size is written: its command line or the Dynamo file.
        "said_in": draw(st.sampled_from(["argv", "Common", "service"])),
        "section": section,
    }


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    plain = RedisServer(tmp_path_factory.mktemp("redis"))
    locked = RedisServer(tmp_path_factory.mktemp("redis-locked"), password="the right one")
    os.environ[KEY_SET] = "a shared secret for the property test"
    os.environ.pop(KEY_UNSET, None)
    yield {
        "<redis>": plain.url,
        "<redis, wrong password>": locked.url.replace("the right one", "a wrong one"),
    }
    os.environ.pop(KEY_SET, None)
    plain.stop()
    locked.stop()


def materialize(case: dict[str, Any], root: Path, redis: dict[str, str]) -> dict[str, Any]:
    """The case's section with its placeholders made real, and the Dynamo file around it."""
    lm = dict(case["section"]["adapters"][0]["config"])
    if lm.get("local_disk") == "<fresh dir>":
        lm["local_disk"] = str(root / "tier")
    elif lm.get("local_disk") == "<under a file>":
        (root / "a-file").write_text("x")
        lm["local_disk"] = str(root / "a-file" / "tier")
    lm["remote_url"] = redis.get(lm.get("remote_url", ""), lm.get("remote_url"))
    if lm["remote_url"] is None:
        del lm["remote_url"]
    section = {**case["section"], "adapters": [{"name": "lmcache", "config": lm}]}
    block, said_in = case["block"], case["said_in"]
    doc: dict[str, Any] = {"Common": {"xconnector": section}, "VllmWorker": {}}
    if said_in == "Common":
        doc["Common"]["block-size"] = block
        doc["VllmWorker"]["common-configs"] = ["block-size"]
    elif said_in == "service":
        doc["VllmWorker"]["block-size"] = block
    argv = ["python", "-m", "dynamo.vllm", "--block-size", str(block)] if said_in == "argv" else []
    return {"doc": doc, "argv": argv, "section": section, "block": block}


def check_config_valid(path: Path, argv: list[str]) -> bool:
    out, err = io.StringIO(), io.StringIO()
    code = check_config(str(path), service="VllmWorker", worker=argv, out=out, err=err)
    assert code in (0, 1), err.getvalue()
    return code == 0


def first_kv_call_works(path: Path, m: dict[str, Any]) -> bool:
    """What a worker does: discover the config (its command line included), build the SDK, and
    store then load a prompt's KV. An XConnector error on the way means it does not run."""
    block = m["block"]
    try:
        found = load_config_file(path, service="VllmWorker", argv=["worker", *m["argv"][1:]])
        section = found.config.to_dict()
    except ConfigError:
        # What an SDK given the bare section tries (with the worker's block size, as discovery
        # gives it): it must fail on its own, not merely on a mismatched block size.
        section = dict(m["section"])
        section.setdefault("performance", {"block_size": block})
    blocks = 2 * (4 * 64 + 1) // block + 4
    rng = np.random.default_rng(0)
    shape = (2, blocks, block, HEADS, HEAD_DIM)
    caches = [rng.standard_normal(shape).astype(np.float16) for _ in range(LAYERS)]
    tokens = rng.integers(1, 50000, 4 * 64 + 1).tolist()
    used = -(-len(tokens) // block)
    src, dst = list(range(used)), list(range(used, 2 * used))
    try:
        with XConnectorSDK(section) as sdk:
            kv = sdk.get_kv_handler()
            if kv.store(tokens, caches, src) <= 0:
                return False
            loaded = kv.load(tokens, caches, dst)
    except XConnectorError:  # what a worker's fail-open turns into "XConnector off"
        return False
    if loaded <= 0:
        return False
    full = loaded // block
    return all(np.array_equal(layer[:, src[:full]], layer[:, dst[:full]]) for layer in caches)


def test_check_config_says_valid_exactly_when_the_sdk_runs(
    redis: dict[str, str], tmp_path: Path
) -> None:
    seen = Counter[str]()
    ids = itertools.count()

    @settings(
        max_examples=250,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(cases())
    def check(case: dict[str, Any]) -> None:
        root = tmp_path / str(next(ids))
        root.mkdir()
        m = materialize(case, root, redis)
        path = root / "graph.yaml"
        path.write_text(yaml.safe_dump(m["doc"]))
        valid = check_config_valid(path, m["argv"])
        works = first_kv_call_works(path, m)
        assert valid == works, (valid, works, m)
        seen["valid" if valid else "invalid"] += 1
        seen["with Redis"] += "remote_url" in case["section"]["adapters"][0]["config"] and valid

    check()
    # Both sides must be common, or the property holds vacuously (a run gives about 40 valid,
    # 15 of them with Redis; the bounds are several standard deviations below).
    assert seen["valid"] >= 15 and seen["invalid"] >= 15 and seen["with Redis"] >= 3, seen
