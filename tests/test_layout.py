"""The repository's boundaries, read from the source with ``ast`` (nothing here imports loraplex or torch,
except one check that imports the API in a child process and finds no torch there).

* Who may import what (DESIGN.md "The layout"): the API never loads torch and sees the engine only through
  its request types; engine, LoRA and model code never import the web stack; the model does not reach up
  into the engine; the registry imports neither the server, nor the trainer, nor torch. Every import counts,
  including those inside functions and under ``if TYPE_CHECKING:``.
* Nothing imports the folders by their bare names (``server``, ``adapters``, ``trainer``): they install as
  ``loraplex.server`` and so on, and the bare names are other projects' on PyPI.
* pyproject.toml's ``[tool.setuptools]`` lists every package folder and maps the four top folders.

Each checker is a function over a source tree root, so the tests below also run it on planted violations.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# repository folder -> the package it installs as
PACKAGE_DIRS = {"loraplex": "loraplex", "adapters": "loraplex.adapters", "server": "loraplex.server",
                "trainer": "loraplex.trainer"}
BARE_NAMES = ("server", "adapters", "trainer")
BARE_SCAN = (*PACKAGE_DIRS, "tests", "benchmarks")  # folders whose .py files must not import a bare name

TORCH_STACK = ("torch", "transformers", "safetensors", "bitsandbytes", "peft", "vllm")
WEB_STACK = ("fastapi", "starlette", "pydantic", "pydantic_settings", "uvicorn")


@dataclass(frozen=True, slots=True)
class Rule:
    scope: str  # the package whose modules the rule binds
    forbidden: tuple[str, ...]  # modules they may not import (a name covers its submodules)
    why: str
    allowed: tuple[str, ...] = ()  # exceptions inside ``forbidden``


RULES = (
    Rule("loraplex.server.api", TORCH_STACK, "the API never imports torch"),
    Rule("loraplex.server.api", ("loraplex.server.engine", "loraplex.server.lora", "loraplex.server.model",
                                 "loraplex.server.vllm"),
         "the API sees the engine only through its request types", allowed=("loraplex.server.engine.request",)),
    Rule("loraplex.server.engine", WEB_STACK, "the engine never imports the web stack"),
    Rule("loraplex.server.lora", WEB_STACK, "LoRA code never imports the web stack"),
    Rule("loraplex.server.model", WEB_STACK, "model code never imports the web stack"),
    Rule("loraplex.server.model", ("loraplex.server.engine",), "the model does not import the engine"),
    Rule("loraplex.adapters", ("loraplex.server", "loraplex.trainer", "torch", "transformers", "peft"),
         "the registry imports neither server, trainer nor torch"),
)
API = "loraplex.server.api"


@dataclass(frozen=True, slots=True)
class Import:
    module: str  # the importing module, e.g. loraplex.server.model.decoder
    name: str  # the imported module, absolute
    line: int


@dataclass(frozen=True, slots=True)
class Violation:
    module: str
    name: str
    line: int
    why: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.name}: {self.why}"


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _python_files(folder: Path) -> Iterator[Path]:
    yield from sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the package folders under ``root``, by its installed name."""
    modules = {}
    for folder, package in PACKAGE_DIRS.items():
        if not (root / folder).is_dir():
            continue
        for path in _python_files(root / folder):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    """What one module imports, relative imports made absolute; ``from p import x`` names ``p.x`` when that
    is a module of the tree, else ``p``."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append(Import(module, sub if sub in known else target, node.lineno))
    return found


def all_imports(root: Path) -> dict[str, list[Import]]:
    files = module_files(root)
    return {m: imports_of(m, p, set(files)) for m, p in files.items()}


def _parents(name: str) -> list[str]:
    """The packages Python initialises before ``name`` (``a.b.c`` -> ``a``, ``a.b``)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_violations(root: Path) -> list[Violation]:
    """Every import under ``root`` that breaks a rule of ``RULES``, plus every torch-stack import in a module
    outside the API that importing the API loads (its parents' ``__init__``, ``engine.request``, ...)."""
    graph = all_imports(root)
    found = []
    for module, imports in graph.items():
        for rule in RULES:
            if not _within(module, (rule.scope,)):
                continue
            found += [Violation(module, i.name, i.line, rule.why) for i in imports
                      if _within(i.name, rule.forbidden) and not _within(i.name, rule.allowed)]
    # what the API loads: its in-tree imports and their parent packages, transitively
    seen: dict[str, str] = {}  # module -> the API module that loads it
    todo = [(m, m) for m in graph if _within(m, (API,))]
    while todo:
        module, via = todo.pop()
        for name in [module, *_parents(module)]:
            if name in graph and name not in seen:
                seen[name] = via
                todo += [(i.name, via) for i in graph[name]]
    for module, via in sorted(seen.items()):
        if not _within(module, (API,)):
            found += [Violation(module, i.name, i.line, f"the API loads this module (from {via})")
                      for i in graph[module] if _within(i.name, TORCH_STACK)]
    return sorted(found, key=lambda v: (v.module, v.line, v.name))


def bare_imports(root: Path, folders: tuple[str, ...] = BARE_SCAN) -> list[str]:
    """``import server…``/``from adapters…``-style absolute imports, and bare dotted names given to
    ``import_module``/``patch``/``setattr`` (monkeypatch's string form), in the .py files of ``folders``."""
    found = []
    for folder in folders:
        if not (root / folder).is_dir():
            continue
        for path in _python_files(root / folder):
            where = path.relative_to(root).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                        and isinstance(node.args[0].value, str) and "." in node.args[0].value:
                    fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                    if fn in ("import_module", "find_spec", "patch", "setattr", "delattr"):
                        names = [node.args[0].value]
                found += [f"{where}:{node.lineno} {n}" for n in names if n.split(".")[0] in BARE_NAMES]
    return found


def package_problems(root: Path) -> list[str]:
    """Where pyproject.toml's ``[tool.setuptools]`` and the package folders under ``root`` disagree."""
    setup = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    problems = []
    expected = {package: folder for folder, package in PACKAGE_DIRS.items()}
    if setup.get("package-dir") != expected:
        problems.append(f"package-dir is {setup.get('package-dir')}, expected {expected}")
    folders = {}  # package -> folder
    for folder, package in PACKAGE_DIRS.items():
        for d in [root / folder, *sorted(p for p in (root / folder).rglob("*") if p.is_dir())]:
            if "__pycache__" not in d.parts and any(d.glob("*.py")):
                folders[".".join((package, *d.relative_to(root / folder).parts))] = d
    listed = setup.get("packages", [])
    problems += [f"package folder {d.relative_to(root).as_posix()}/ is missing from packages ({p})"
                 for p, d in sorted(folders.items()) if p not in listed]
    problems += [f"packages lists {p}, but it has no folder of .py files" for p in listed if p not in folders]
    return problems


# ---------------------------------------------------------------- the repository


def test_imports_keep_the_layers():
    violations = import_violations(ROOT)
    assert not violations, "\n".join(map(str, violations))


def test_the_checker_sees_the_whole_tree():
    modules = module_files(ROOT)
    assert {"loraplex.cli", "loraplex.server.api.app", "loraplex.server.engine.request",
            "loraplex.adapters.registry", "loraplex.trainer.config"} <= set(modules)
    graph = all_imports(ROOT)
    assert any(i.name == "loraplex.server.engine.request" for i in graph["loraplex.server.api.app"] + graph.get(
        "loraplex.server.api.backend", []))


def test_importing_the_api_loads_no_torch():
    """The same rule at run time, where an import the source hides (or one a dependency makes) shows."""
    pytest.importorskip("fastapi")
    api = sorted(m for m, p in module_files(ROOT).items() if _within(m, (API,)) and p.name != "__init__.py")
    code = ("import importlib, sys\n"
            f"for m in {api!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {TORCH_STACK!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing {', '.join(api)} loaded {out.stdout.strip()}"


def test_nothing_imports_a_bare_folder_name():
    found = bare_imports(ROOT)
    assert not found, "import these as loraplex.<name>:\n" + "\n".join(found)


def test_pyproject_lists_every_package():
    problems = package_problems(ROOT)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- the checkers, on planted violations


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


_CLEAN = {
    "loraplex/__init__.py": "",
    "loraplex/cli.py": "from loraplex.adapters.cli import COMMANDS\n",
    "adapters/__init__.py": "from .errors import LoraplexError\n",
    "adapters/errors.py": "class LoraplexError(Exception): ...\n",
    "adapters/cli.py": "COMMANDS = {}\n",
    "server/__init__.py": "",
    "server/api/__init__.py": "",
    "server/api/app.py": "import fastapi\nfrom ..engine.request import SamplingParams\n"
                         "from loraplex.adapters import errors\n",
    "server/engine/__init__.py": "",
    "server/engine/request.py": "import math\n",
    "server/engine/engine.py": "import torch\nfrom ..model.kv_cache import KVCache\nfrom ..lora import bank\n",
    "server/lora/__init__.py": "",
    "server/lora/bank.py": "import torch\nfrom loraplex.adapters.errors import LoraplexError\n",
    "server/model/__init__.py": "",
    "server/model/kv_cache.py": "import torch\n",
    "server/model/decoder.py": "import torch\nfrom .kv_cache import KVCache\nfrom ..lora.bank import LoraBank\n",
    "trainer/__init__.py": "",
    "trainer/config.py": "import pydantic\nfrom loraplex.adapters.errors import LoraplexError\n",
}


def test_import_checker_reports_planted_violations(tmp_path):
    clean = _tree(tmp_path / "clean", _CLEAN)
    assert import_violations(clean) == []
    planted = _tree(tmp_path / "planted", _CLEAN | {
        "server/api/app.py": _CLEAN["server/api/app.py"] + "import torch\n",
        "server/api/backend.py": "def start():\n    from loraplex.server.engine.engine import Engine\n",
        "server/model/decoder.py": _CLEAN["server/model/decoder.py"] + "from ..engine.kv_cache import X\n",
        "server/engine/__init__.py": "from .engine import Engine\n",
        "server/lora/bank.py": _CLEAN["server/lora/bank.py"] + "def f():\n    from pydantic import BaseModel\n",
        "adapters/cli.py": _CLEAN["adapters/cli.py"] + "from loraplex.trainer import config\n",
    })
    found = {(v.module, v.name) for v in import_violations(planted)}
    assert found == {
        ("loraplex.server.api.app", "torch"),
        ("loraplex.server.api.backend", "loraplex.server.engine.engine"),
        ("loraplex.server.model.decoder", "loraplex.server.engine.kv_cache"),
        ("loraplex.server.lora.bank", "pydantic"),
        ("loraplex.adapters.cli", "loraplex.trainer.config"),
        # engine/__init__ now loads the engine, and the API loads engine/__init__ on its way to engine.request
        ("loraplex.server.engine.engine", "torch"),
        ("loraplex.server.lora.bank", "torch"),
        ("loraplex.server.model.kv_cache", "torch"),
    }


def test_bare_import_checker_reports_planted_violations(tmp_path):
    root = _tree(tmp_path, _CLEAN | {
        "tests/test_x.py": "import loraplex.server\nimport server_fixtures\nfrom adapters_extra import y\n",
        "benchmarks/run.py": "from loraplex.trainer import config\n",
    })
    assert bare_imports(root) == []
    _tree(root, {
        "tests/test_x.py": "import loraplex.server\nimport server.engine.engine\n",
        "benchmarks/run.py": "def f(monkeypatch):\n    from trainer import config\n"
                             "    monkeypatch.setattr('adapters.cli.COMMANDS', {})\n",
        "server/lora/bank.py": "from adapters.errors import LoraplexError\n",
        "tests/sub/helper.py": "import importlib\nimportlib.import_module('server.commands')\n",
    })
    assert bare_imports(root) == [
        "server/lora/bank.py:1 adapters.errors",
        "tests/sub/helper.py:2 server.commands",
        "tests/test_x.py:2 server.engine.engine",
        "benchmarks/run.py:2 trainer",
        "benchmarks/run.py:3 adapters.cli.COMMANDS",
    ]


_PYPROJECT = """\
[tool.setuptools]
package-dir = {{ "loraplex" = "loraplex", "loraplex.adapters" = "adapters", "loraplex.server" = "server", \
"loraplex.trainer" = "trainer" }}
packages = [{packages}]
"""
_PACKAGES = ["loraplex", "loraplex.adapters", "loraplex.server", "loraplex.server.api", "loraplex.server.engine",
             "loraplex.server.lora", "loraplex.server.model", "loraplex.trainer"]


def _pyproject(root: Path, packages: list[str], text: str = _PYPROJECT) -> None:
    (root / "pyproject.toml").write_text(text.format(packages=", ".join(f'"{p}"' for p in packages)))


def test_package_checker_reports_planted_mismatches(tmp_path):
    root = _tree(tmp_path, _CLEAN | {"server/model/__pycache__/x.py": ""})
    _pyproject(root, _PACKAGES)
    assert package_problems(root) == []
    _tree(root, {"server/vllm/backend.py": "", "trainer/notes/readme.txt": ""})
    _pyproject(root, [*_PACKAGES, "loraplex.adapters.gone"])
    assert package_problems(root) == [
        "package folder server/vllm/ is missing from packages (loraplex.server.vllm)",
        "packages lists loraplex.adapters.gone, but it has no folder of .py files",
    ]
    _pyproject(root, [*_PACKAGES, "loraplex.server.vllm"], _PYPROJECT.replace('"loraplex.trainer" = "trainer"',
                                                                              '"loraplex.trainer" = "train"'))
    assert len(package_problems(root)) == 1 and "package-dir" in package_problems(root)[0]


def test_test_file_names_are_unique():
    """Tests are laid out as the packages, and pytest imports each test file by its base name (the test folders
    are not packages): two test files of one name in two folders would break collection."""
    tests = Path(__file__).resolve().parent
    seen: dict[str, Path] = {}
    clashes = []
    for f in sorted(tests.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        if f.name in seen and f.name not in ("__init__.py", "conftest.py"):  # pytest keys conftests by path
            clashes.append(f"{seen[f.name].relative_to(tests)} and {f.relative_to(tests)}")
        seen.setdefault(f.name, f)
    assert clashes == []
