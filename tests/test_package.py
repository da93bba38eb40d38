"""The package's face and its rooms: the public names, the README's Python API,
the import order of the folders, and the names that messages and documents give."""

import ast
import importlib
import re
from importlib.metadata import version
from pathlib import Path

import drlora_mlx

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "drlora_mlx"
PUBLIC = {"attach", "load", "run", "DRLoRAConfig", "TrainingArgs", "export_peft", "import_peft", "fuse",
          "build_tiny", "memory_plan", "DRLoRA", "DRLoRAError", "InputError", "__version__"}
# The rooms from the bottom up: a module imports from its own room or from rooms on lower floors only.
FLOORS = {"errors": 0, "files": 1, "version": 0, "method": 2, "families": 2, "config": 3, "data": 4, "lora": 5,
          "display": 6, "formats": 7, "training": 8, "cli": 9, "__main__": 10, "__init__": 10}


def test_the_package_exposes_what_users_call():
    assert set(drlora_mlx.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(drlora_mlx, name) is not None, name
    assert callable(drlora_mlx.run) and callable(drlora_mlx.load) and callable(drlora_mlx.attach)
    assert issubclass(drlora_mlx.InputError, drlora_mlx.DRLoRAError)


def test_one_version_number():
    assert re.search(rf'^version = "{re.escape(drlora_mlx.__version__)}"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version("drlora-mlx") == drlora_mlx.__version__
    assert f"drlora-mlx {drlora_mlx.__version__}" in (ROOT / "BENCHMARKS.md").read_text()


def _room(module: str) -> str:
    """'drlora_mlx.lora.attach' -> 'lora'; 'drlora_mlx' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    """(module, imported module) for every import of the package by ``path``, relative ones resolved."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    if path.name == "__init__.py":
        package = package[:-1]
        module = ".".join(package)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            if not target.startswith("drlora_mlx"):
                continue
            if node.module is None:  # from . import a, b: each may be a module
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    found = (ROOT / candidate.replace(".", "/")).with_suffix(".py").exists()
                    yield module, candidate if found else target
            else:
                yield module, target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("drlora_mlx"):
                    yield module, alias.name


def _package_imports():
    return [pair for path in sorted(PACKAGE.rglob("*.py")) for pair in _imports(path)]


def test_every_module_belongs_to_a_room():
    rooms = {_room(".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")}
    assert rooms == set(FLOORS), rooms ^ set(FLOORS)


def test_no_import_runs_back_up_the_floors():
    pairs = _package_imports()
    assert len(pairs) > 150  # the reader finds the imports it checks
    wrong = [(a, b) for a, b in pairs if _room(a) != _room(b) and FLOORS[_room(b)] >= FLOORS[_room(a)]]
    assert not wrong, wrong


def test_the_method_folder_imports_no_io_training_formats_or_display():
    used = {_room(b) for a, b in _package_imports() if _room(a) == "method"}
    assert used <= {"method", "errors"}, used
    for path in (PACKAGE / "method").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                assert name.split(".")[0] not in {"os", "io", "json", "pathlib", "shutil", "safetensors",
                                                  "mlx_lm", "click", "rich"}, (path.name, name)


def _resolve(dotted: str):
    """The object a dotted name in a message or document means: a module or an attribute of one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def test_every_package_name_a_message_or_document_gives_exists():
    texts = [p.read_text() for p in [*PACKAGE.rglob("*.py"), *(ROOT / "scripts").glob("*.py")]]
    texts += [(ROOT / name).read_text() for name in ("README.md", "BENCHMARKS.md", "docs/METHOD.md")]
    names = set(re.findall(r"\bdrlora_mlx(?:\.[A-Za-z_]\w*)+", "\n".join(texts)))
    assert "drlora_mlx.load" in names  # a run's own message names it
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ModuleNotFoundError, AttributeError):
            missing.append(name)
    assert not missing, missing


def test_the_readme_lists_every_file_folder_by_folder():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## How it works"): readme.index("Choices the paper leaves open")]
    listed, folder = set(), None
    for row in re.findall(r"^\|(.*)\|$", section, re.M):
        cells = [c.strip() for c in row.split("|")]
        if len(cells) != 3 or not cells[1].startswith("`"):
            continue
        folder = cells[0].strip("`") or folder
        for name in re.findall(r"`([^`]+)`", cells[1]):
            listed.add(folder + name.rstrip("/"))
    files = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")} - {
        str(p.relative_to(ROOT)) for p in PACKAGE.glob("*/__init__.py") if p.parent.name != "families"}
    files.add("drlora_mlx/data/tasks")
    assert listed == files, (sorted(listed - files), sorted(files - listed))


def _python_api_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Python API")
    return re.findall(r"```python\n(.*?)```", readme[start: readme.index("\n## ", start + 1)], re.S)


def test_the_readme_python_api_runs(tmp_path, monkeypatch, capsys):
    """The README's Python API snippets, run as they stand on the built-in tiny model and the bundled
    tasks: its placeholders filled in and 2000 iterations made 8."""
    from drlora_mlx.data.loading import bundled_data_dir
    from drlora_mlx.formats.tiny import builtin_model_path

    blocks = _python_api_blocks()
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        assert "import drlora_mlx" in code and not re.search(r"from drlora_mlx\.\w", code)  # the public names only
        code = (code.replace("path/to/model", str(builtin_model_path())).replace("path/to/data", str(bundled_data_dir()))
                .replace("drlora_mlx.run()", "drlora_mlx.run(iters=8)").replace("iters=2000", "iters=8"))
        exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "resuming from adapters/checkpoints/step-0000008 at iteration 8 of 8" in out
    assert "mean active rank            16.00" in out  # r_target 16 reached
    assert re.search(r"^\d+\.\d+ GB$", out, re.M)  # the memory plan's peak
    for written in ("adapters/adapters.safetensors", "peft_adapter/adapter_model.safetensors",
                    "fused_model/config.json", "tiny_model/config.json"):
        assert (tmp_path / written).exists(), written
