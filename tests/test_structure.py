"""The shape of the code: layers without cycles, small functions, one options schema.

The layer table below is the architecture (docs/ARCHITECTURE.md): a module may import modules of its own layer
or of a lower one, never a higher one, at module level, inside a function or under ``TYPE_CHECKING`` alike; and
the import graph of ``yolo_prune`` has no cycle.
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "yolo_prune"

# bottom-up; a module belongs to the first entry that names it or a package above it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("errors", "compat", "results", "io", "logs", "forms", "modules", "stats", "provenance", "report", "options",
              "config")),
    ("data, models, evaluate, runtimes", ("data", "models", "evaluate", "runtimes", "bench", "quantize", "quantize_control",
                                          "qat", "deploy")),
    ("pruning", ("pruning",)),
    ("latency", ("latency",)),
    ("train", ("train",)),
    ("stages", ("run", "stages")),
    ("pipeline", ("job", "demo")),
    ("cli and API", ("cli", "")),
]
MAX_LINES = 80  # of a function's body, its docstring left out
MAX_PARAMS = 12  # besides *options / **overrides


def layer_of(module: str) -> int:
    """The layer index of ``yolo_prune.a.b`` (by its first component; ``yolo_prune`` itself is the API)."""
    first = module.split(".")[1] if "." in module else ""
    for i, (_, names) in enumerate(LAYERS):
        if first in names:
            return i
    raise AssertionError(f"module {module} is in no layer of tests/test_structure.py: add it to LAYERS")


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported yolo_prune module, line, inside a function) for every import statement of ``path``. Importing
    ``a.b.c`` also runs the package ``a.b``, so that counts as an import of it too."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[str] = []
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - child.level + 1]
                    base = ".".join(parts + ([child.module] if child.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in child.names]
            elif isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            reached: set[str] = set()
            for target in targets:
                while target and target not in known:  # `from .x import name`: name is no module, x is
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                while target and target != module and not module.startswith(target + "."):
                    reached.add(target)  # the module and every package above it run
                    target = target.rsplit(".", 1)[0] if "." in target else ""
            found.extend((t, child.lineno, in_function) for t in sorted(reached - {"yolo_prune"}))
            visit(child, nested)

    visit(tree, False)
    return found


def import_graph(package: Path = PACKAGE) -> tuple[dict[str, set[str]], list[str]]:
    """The import graph of the package, and the function-level imports of its own modules."""
    files = module_files(package)
    graph: dict[str, set[str]] = {m: set() for m in files}
    inner: list[str] = []
    for module, path in files.items():
        for target, line, in_function in imports_of(module, path, set(files)):
            graph[module].add(target)
            if in_function:
                inner.append(f"{path.relative_to(package.parent)}:{line} imports {target} inside a function")
    return graph, inner


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                bad.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                           f"({LAYERS[layer_of(target)][0]}), a higher layer")
    return bad


def test_no_import_cycle_and_no_upward_import():
    graph, _ = import_graph()
    assert len(graph) > 40  # the scan really read the package
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert layer_violations(graph) == []


def test_no_function_level_import_of_own_modules():
    """Function-level imports stay only for heavy optional dependencies (openvino, onnxruntime...), not to hide a
    cycle between yolo_prune's own modules."""
    _, inner = import_graph()
    assert inner == []


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    """A synthetic package with a cycle and an upward import: both checks must fail on it."""
    pkg = tmp_path / "yolo_prune"
    (pkg / "pruning").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from .pruning import engine\n")  # core -> pruning: upward, and a cycle
    (pkg / "pruning" / "__init__.py").write_text("")
    (pkg / "pruning" / "engine.py").write_text("def f():\n    from ..errors import X\n")
    graph, inner = import_graph(pkg)
    assert graph["yolo_prune.errors"] == {"yolo_prune.pruning", "yolo_prune.pruning.engine"}
    assert find_cycle(graph) in (["yolo_prune.errors", "yolo_prune.pruning.engine", "yolo_prune.errors"],
                                 ["yolo_prune.pruning.engine", "yolo_prune.errors", "yolo_prune.pruning.engine"])
    assert any("yolo_prune.errors (core) imports yolo_prune.pruning.engine (pruning)" in v
               for v in layer_violations(graph))
    assert inner == ["yolo_prune/pruning/engine.py:2 imports yolo_prune.errors inside a function"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _functions(package: Path = PACKAGE):
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(package.parent), node


def _body_lines(node: ast.FunctionDef) -> int:
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_no_long_function():
    long = [f"{p}:{n.lineno} {n.name} ({_body_lines(n)} lines)" for p, n in _functions() if _body_lines(n) > MAX_LINES]
    assert long == []


def test_no_long_parameter_list():
    def count(n: ast.FunctionDef) -> int:
        a = n.args
        names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
        return len(names)

    many = [f"{p}:{n.lineno} {n.name} ({count(n)})" for p, n in _functions() if count(n) > MAX_PARAMS]
    assert many == []


# --------------------------------------------------------------------------------------------- the schema
def test_default_yaml_is_generated_from_the_schema():
    from yolo_prune.options import default_yaml

    assert (ROOT / "cfg" / "default.yaml").read_text(encoding="utf-8") == default_yaml(), \
        "cfg/default.yaml differs from the schema: run `python -m yolo_prune.options > cfg/default.yaml`"


def test_every_key_reaches_cli_cfg_and_the_script():
    """Every schema key is accepted by the CLI, documented by `yolo-prune cfg`, and offered by
    tools/prune_yolo.py when mode pipeline reads it."""
    from yolo_prune import cli
    from yolo_prune.config import build
    from yolo_prune.options import SCHEMA

    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["cfg"]) == 0
    shown = {line.split(":", 1)[0] for line in out.getvalue().splitlines() if line and not line.startswith("#")}
    assert shown == set(SCHEMA)
    script = subprocess.run([sys.executable, str(ROOT / "tools" / "prune_yolo.py"), "--help"], capture_output=True,
                            text=True, check=True, cwd=ROOT).stdout
    for name, key in SCHEMA.items():
        cfg, _ = build("prune" if name != "mode" else "val", {} if name == "mode" else {name: _sample(key)})
        assert name in cfg
        flag = "--" + name.replace("_", "-")
        if "pipeline" in key.modes and name != "mode":
            assert flag in script, f"{flag} missing from tools/prune_yolo.py --help"
        elif name != "mode":
            assert flag not in script.split(), f"{flag} offered by the pipeline script but not a pipeline key"


def _sample(key):
    """A valid command-line value of ``key`` (text, as the CLI receives it)."""
    if key.choices:
        return str(key.choices[0])
    if key.default is not None:
        return str(key.default)
    return {"int": "1", "float": "0.5", "device": "cpu"}.get(key.name, {"int": "1", "float": "0.5"}.get(key.kind, "x"))


def test_values_are_read_by_the_declared_type():
    from yolo_prune.config import build
    from yolo_prune.errors import UsageError

    cfg, extra = build("prune", {"compensate": "none", "teacher": "none", "round_to": "null", "recalibrate": "reset",
                                 "runtime": "ort", "target_macs": "0.4", "name": "123", "lr0": "0.01"})
    assert cfg["compensate"] == "none" and cfg["teacher"] == "none" and cfg["round_to"] is None
    assert cfg["recalibrate"] == "reset" and cfg["runtime"] == "onnxruntime" and cfg["target_macs"] == 0.4
    assert cfg["name"] == "123" and extra == {"lr0": 0.01}
    cfg, _ = build("prune", {"latency_aware": "true", "verify_latency": "false"})
    assert cfg["latency_aware"] is True and cfg["verify_latency"] is False
    for bad in ({"compensate": "nope"}, {"target_macs": "1.5"}, {"steps": "two"}, {"exist_ok": "maybe"}):
        with pytest.raises(UsageError):
            build("prune", bad)


def test_option_objects_are_typed_frozen_and_checked():
    import dataclasses

    import yolo_prune as yp
    from yolo_prune.errors import UsageError

    opts = yp.PruneOptions(method="bn", target_macs="0.3")
    assert opts.target_macs == 0.3 and opts.steps == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.steps = 2
    with pytest.raises(UsageError, match="did you mean 'method'"):
        yp.PruneOptions.make(methd="bn")
    with pytest.raises(UsageError, match="out of range"):
        opts.replace(max_layer_ratio=1.0)


@pytest.mark.parametrize("mode", ["prune", "pipeline", "sparsify", "sparse", "finetune", "sensitivity"])
def test_every_key_of_a_mode_reaches_its_function(mode):
    """The CLI hands a mode's keys (by the schema's ``modes``) to its API function: each must land in one of the
    option objects that function reads, so a new key needs no hand list anywhere."""
    import importlib

    from yolo_prune import cli
    from yolo_prune.config import build
    from yolo_prune.options import settings_and_rest

    module = {"prune": "stages.prune", "pipeline": "job", "sparsify": "stages.sparsify", "sparse": "train.sparse",
              "finetune": "train.finetune", "sensitivity": "stages.sensitivity"}[mode]
    groups = importlib.import_module(f"yolo_prune.{module}").GROUPS
    cfg, _ = build(mode, {"latency_aware": "0.5"} if mode == "prune" else {})
    keys = cli.mode_keys(cfg)
    s, rest = settings_and_rest(groups, (), keys, where=mode)
    assert rest == {} and keys  # nothing would fall through to ultralytics as an unknown train key
    if mode == "prune":
        assert s.latency.latency_aware == 0.5  # a key added to the schema reaches prune() with no other edit


def test_every_public_name_resolves_and_every_returned_result_is_exported():
    import typing

    import yolo_prune as yp

    for name in yp.__all__:
        assert getattr(yp, name) is not None
        # a submodule of the same name would replace the public name once imported (yp.pipeline -> a module)
        assert not (PACKAGE / f"{name}.py").exists() and not (PACKAGE / name).is_dir(), name
    import yolo_prune.job  # noqa: F401  (imported: the public function must stay the function)

    assert callable(yp.pipeline) and callable(yp.export)
    for fn in (yp.prune, yp.sparsify, yp.sensitivity, yp.pipeline, yp.finetune, yp.sparse_train, yp.validate,
               yp.benchmark, yp.model_stats):
        returned = typing.get_type_hints(fn).get("return")
        assert returned is not None and returned.__name__ in yp.__all__, fn.__name__
