"""The Python package's layers import only downward.

From the bottom: foundations (the native module's loader, exceptions, config, switches, patching
machinery), the adapters, the SDK, the vLLM integration, the Dynamo integration (a Dynamo worker
is a vLLM worker, so Dynamo's builds on vLLM's, never the reverse), and the command-line tools.
Every import counts, including those inside functions and under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "xconnector"

LAYERS = [
    (
        "foundations",
        [
            "xconnector",
            "xconnector._loader",
            "xconnector._native",
            "xconnector.config",
            "xconnector.exceptions",
            "xconnector.logs",
            "xconnector.patching",
            "xconnector.switches",
        ],
    ),
    ("adapters", ["xconnector.adapters"]),
    ("sdk", ["xconnector.sdk", "xconnector.core"]),
    ("vllm integration", ["xconnector.integrations.vllm"]),
    ("dynamo integration", ["xconnector.integrations", "xconnector.integrations.dynamo"]),
    (
        "tools",
        [
            "xconnector.__main__",
            "xconnector.cli",
        ],
    ),
]
# Documented names kept where earlier code imported them from: they re-export a lower layer
# and nothing in the package may import them.
REEXPORTS = {
    "xconnector.sdk.config": "xconnector.config.schema",
    "xconnector.sdk.exceptions": "xconnector.exceptions",
    "xconnector.integrations.dynamo.config_detector": "xconnector.config.discovery",
    "xconnector.integrations.dynamo.minimal_sdk": "xconnector.sdk.process",
}


def layer_of(module: str) -> int:
    """The layer of the longest listed prefix of `module`."""
    best, found = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    assert found is not None, f"{module} is in no layer; add it to LAYERS"
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `xconnector` import in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from xconnector.sdk import process` imports the submodule when there is one.
            for a in node.names:
                sub = f"{base}.{a.name}"
                found = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                out.append((node.lineno, sub if found else base))
    return [(line, m) for line, m in out if m == "xconnector" or m.startswith("xconnector.")]


def test_every_import_goes_to_the_same_layer_or_below() -> None:
    wrong = []
    files = sorted(p for p in PACKAGE.rglob("*.py") if "_bootstrap" not in p.parts)
    assert len(files) > 30  # the walk found the package
    for path in files:
        here = module_name(path)
        if here in REEXPORTS:
            continue
        mine = layer_of(here)
        for line, target in imports(path):
            if target in REEXPORTS:
                wrong.append(f"{here}:{line} imports {target}; use {REEXPORTS[target]}")
            elif layer_of(target) > mine:
                up = LAYERS[layer_of(target)][0]
                wrong.append(f"{here}:{line} ({LAYERS[mine][0]}) imports {target} ({up})")
    assert wrong == [], "\n".join(wrong)


def test_the_checker_sees_imports_and_orders_layers() -> None:
    # The walk above would pass vacuously if `imports` missed function-level or relative imports.
    sample = PACKAGE / "adapters" / "base.py"
    found = [m for _, m in imports(sample)]
    assert "xconnector.config.schema" in found
    assert layer_of("xconnector.sdk.xconnector_sdk") > layer_of("xconnector.adapters.lmcache")
    assert layer_of("xconnector.integrations.dynamo.autopatch") > layer_of(
        "xconnector.integrations.vllm.connector"
    )


def test_the_rust_core_has_no_module_cycles(tmp_path: Path) -> None:
    script = PACKAGE.parent / "scripts" / "module_cycles.py"
    core = PACKAGE.parent / "rust" / "xconnector-core" / "src"
    ok = subprocess.run([sys.executable, str(script), str(core)], capture_output=True, text=True)
    assert ok.returncode == 0 and "no cycles among" in ok.stdout, ok.stdout + ok.stderr
    # The checker sees a cycle when there is one (it would pass vacuously otherwise).
    (tmp_path / "lib.rs").write_text("pub mod a;\npub mod b;\n")
    (tmp_path / "a.rs").write_text("use crate::b::B;\npub struct A;\n")
    (tmp_path / "b.rs").write_text("use crate::a::A;\npub struct B;\n")
    bad = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True
    )
    assert bad.returncode != 0, bad.stdout


#: The Python package's size (lines of `.py`, stubs excluded): glue over the native core, at
#: most 3,300 lines (issue 15). Logic goes native rather than this number up.
PYTHON_LINES = 3300


def test_the_python_layer_stays_glue() -> None:
    sizes = {
        str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")
    }
    biggest = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
    assert sum(sizes.values()) <= PYTHON_LINES, f"{sum(sizes.values())} lines; largest: {biggest}"
