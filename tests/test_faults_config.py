"""Fault matrix, inputs: bad constructor arguments and secrets.

Every bad argument raises an XConnectorError that names the argument and what to pass (never a
bare TypeError, OverflowError or FileNotFoundError), and no secret (a URL's password, the Redis
auth key) reaches a log line, an error message or check-config's output.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from services import NatsServer, free_port

from xconnector import Engine, native
from xconnector.exceptions import XConnectorError
from xconnector.logs import set_level
from xconnector.sdk.handlers.distributed import DistributedHandler

SECRET = "hunter2-do-not-print"
BASE: dict[str, Any] = {"block_bytes": 256, "capacity_bytes": 64 * 256}


@pytest.mark.parametrize(
    ("arg", "value"),
    [
        ("block_bytes", -1),
        ("block_bytes", 0),
        ("block_bytes", "256"),
        ("block_bytes", 2.5),
        ("block_bytes", True),
        ("capacity_bytes", -5),
        ("capacity_bytes", 2**80),
        ("block_size", 0),
        ("block_size", 2**40),
        ("tp_world_size", 0),
        ("tp_rank", -1),
        ("pp_world_size", 0),
        ("disk_capacity_bytes", -1),
        ("disk_queue_blocks", 0),
        ("disk_path", ""),
        ("disk_path", 5),
        ("redis_queue_blocks", -3),
        ("redis_batch_blocks", 0),
        ("redis_timeout", 0),
        ("redis_timeout", -1.0),
        ("redis_timeout", float("nan")),
        ("redis_url", 6379),
        ("redis_ca_file", ""),
        ("events_url", b"nats://x"),
        ("events_queue", 0),
        ("redis_auth_key", SECRET),  # without redis_url
        ("disk_shared", "yes"),
        ("redis_timeout", "20ms"),
    ],
)
def test_a_bad_constructor_argument_is_an_xconnector_error_naming_it(
    arg: str, value: object
) -> None:
    with pytest.raises(XConnectorError) as e:
        Engine(**{**BASE, arg: value})
    assert arg in str(e.value), str(e.value)


def test_numpy_integers_are_integers() -> None:
    np = pytest.importorskip("numpy")
    e = Engine(
        block_bytes=np.int64(256), capacity_bytes=np.uint32(64 * 256), block_size=np.int32(16)
    )
    assert (e.block_bytes, e.capacity_bytes, e.block_size) == (256, 64 * 256, 16)


def test_a_huge_block_size_in_bytes_is_refused_before_any_size_overflows() -> None:
    with pytest.raises(XConnectorError, match="block_bytes"):
        Engine(block_bytes=2**62, capacity_bytes=2**63)


def test_the_auth_key_and_url_passwords_never_reach_errors_or_stats(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="xconnector"):
        for url in [f"redis://:{SECRET}@127.0.0.1:{free_port()}", f"http://:{SECRET}@127.0.0.1:1"]:
            try:
                e = Engine(**BASE, redis_url=url, redis_auth_key=SECRET)
                text = json.dumps(e.stats()) + repr(e)
            except XConnectorError as err:
                text = str(err)
            assert SECRET not in text
    assert SECRET not in caplog.text


def test_a_nats_url_with_credentials_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    # A closed loopback port: following events fails, and says so without the password.
    url = f"nats://app:{SECRET}@127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="xconnector"):
        assert DistributedHandler("w", None, 16).follow_events(url, "xconnector.kv_events") is False
    said = [r.getMessage() for r in caplog.records]
    assert (
        len(said) == 1 and "not following peer events" in said[0] and "app:***@127.0.0.1" in said[0]
    ), said
    assert SECRET not in caplog.text
    with pytest.raises(XConnectorError) as err:
        native().EventSubscriber(url, "s", timeout=0.5)
    assert SECRET not in str(err.value)


def test_the_nats_token_is_not_printed_when_the_server_refuses_it() -> None:
    """A real NATS server that wants another token: the refusal names no secret."""
    nats = NatsServer(token="the-right-token")
    try:
        url = f"nats://{SECRET}@127.0.0.1:{nats.port}"
        with pytest.raises(XConnectorError) as err:
            native().EventSubscriber(url, "s", timeout=2.0)
        assert SECRET not in str(err.value) and "***@127.0.0.1" in str(err.value)
    finally:
        nats.stop()


CONFIG = f"""
Common:
  xconnector:
    enabled: true
    mode: hybrid
    adapters:
      - name: lmcache
        type: cache
        config:
          remote_url: "redis://:{SECRET}@127.0.0.1:6379"
          remote_auth_key: "{SECRET}"
          storage_backend: redis
      - name: dynamo
        type: distributed
        config:
          nats_url: "nats://app:{SECRET}@127.0.0.1:4222"
"""


@pytest.mark.parametrize("as_json", [False, True])
def test_check_config_prints_no_secret(tmp_path: Path, as_json: bool) -> None:
    f = tmp_path / "cfg.yaml"
    f.write_text(CONFIG)
    cmd = [sys.executable, "-m", "xconnector", "check-config", str(f)] + (
        ["--json"] if as_json else []
    )
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert SECRET not in r.stdout + r.stderr
    # The rest is still shown: the hosts, and that a key is set.
    assert "127.0.0.1:6379" in r.stdout and "127.0.0.1:4222" in r.stdout and "***" in r.stdout


def test_a_rejected_url_is_not_echoed_with_its_password(tmp_path: Path) -> None:
    f = tmp_path / "cfg.yaml"
    f.write_text(CONFIG.replace("redis://", "http://"))
    r = subprocess.run(
        [sys.executable, "-m", "xconnector", "check-config", str(f)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "remote_url" in r.stderr, r.stdout + r.stderr
    assert SECRET not in r.stdout + r.stderr


def test_nats_credentials_reach_the_server_but_no_log_line_even_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The NATS client logs its server address at debug level: it is never handed the password.
    A real server with user/password auth proves the credentials still log in."""
    nats = NatsServer(user=("app", SECRET))
    set_level(logging.DEBUG)
    try:
        with caplog.at_level(logging.DEBUG, logger="xconnector"):
            url = f"nats://app:{SECRET}@127.0.0.1:{nats.port}"
            sub = native().EventSubscriber(url, "xc.test", timeout=5.0)
            e = Engine(**BASE, events_url=url, events_subject="xc.test", worker_id="w")
            toks = list(range(32))
            e.store(toks, bytes(2 * 256))
            assert e.flush(30)
            batch = sub.next(10.0)
            # And a server that is not there: the client retries, logging each attempt.
            gone = Engine(**BASE, events_url=f"nats://app:{SECRET}@127.0.0.1:{free_port()}")
            time.sleep(1.5)  # let a few connection attempts be logged (no assertion on time)
            del gone
        assert batch is not None and e.stats()["events_published"] >= 1
        # The client's own debug lines were captured (they name the server), without the secret.
        assert any(
            "127.0.0.1" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG
        )
        assert SECRET not in caplog.text
    finally:
        set_level(logging.NOTSET)
        nats.stop()


def test_an_adapter_configs_repr_hides_its_secrets() -> None:
    from xconnector.config.schema import AdapterConfig

    a = AdapterConfig(
        name="lmcache", config={"remote_url": f"redis://:{SECRET}@h:1", "remote_auth_key": SECRET}
    )
    assert SECRET not in repr(a) and "h:1" in repr(a)
    assert a.config["remote_auth_key"] == SECRET  # still there for the engine


def test_an_inline_auth_key_is_not_put_into_vllms_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM may print its kv_transfer_config: the autopatch moves an inline secret into the
    environment the engine processes inherit, and names it there."""
    from xconnector.config.schema import SDKConfig
    from xconnector.integrations.vllm.engine_config import AUTH_KEY_ENV, v1_transfer_config

    monkeypatch.delenv(AUTH_KEY_ENV, raising=False)
    section = SDKConfig.from_dict(
        {
            "enabled": True,
            "mode": "hybrid",
            "adapters": [
                {
                    "name": "lmcache",
                    "config": {"remote_url": "redis://127.0.0.1:6379", "remote_auth_key": SECRET},
                }
            ],
        }
    ).to_dict()
    out = v1_transfer_config(None, section)
    assert out is not None and SECRET not in json.dumps(out)
    cfg = out["kv_connector_extra_config"]["xconnector"]["adapters"][0]["config"]
    assert cfg["remote_auth_key_env"] == AUTH_KEY_ENV and os.environ[AUTH_KEY_ENV] == SECRET
    # What the worker reads back from it is a valid config that finds the same secret.
    SDKConfig.from_dict(out["kv_connector_extra_config"]["xconnector"])
