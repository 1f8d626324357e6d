"""The import rules of DESIGN.md, enforced on the source: nodes -> firered_core <- trainer,
no ComfyUI in the core, heavy libraries imported where they are used, and a pack that ComfyUI
can import under any folder name without loading them."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFY = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "execution", "latent_preview"}
HEAVY = {"diffusers", "transformers", "peft", "bitsandbytes", "accelerate", "gguf"}


def imports(path: Path, top_level_only: bool = False):
    """(module, level, lineno) of every import in a file; ``level`` > 0 for relative imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, 0, node.lineno
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level, node.lineno


def py_files(package: str):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files in {package}/"
    return files


def resolve(path: Path, module: str, level: int) -> str:
    """The first component, inside the pack, that a relative import reaches ('' if outside)."""
    if level == 0:
        return module.split(".")[0]
    rel = path.relative_to(ROOT).parts[:-1]
    base = rel[: len(rel) - (level - 1)] if level - 1 <= len(rel) else ()
    parts = list(base) + ([module] if module else [])
    return ".".join(parts).split(".")[0] if parts else "<pack root>"


@pytest.mark.parametrize("path", py_files("firered_core"), ids=lambda p: p.name)
def test_core_never_imports_comfyui_nodes_or_trainer(path):
    for module, level, line in imports(path):
        first = resolve(path, module, level)
        assert first not in COMFY, f"{path.name}:{line} imports ComfyUI module {module!r}"
        assert first not in ("nodes", "trainer", "firered_trainer", "<pack root>"), f"{path.name}:{line} imports {module!r}"


#: The core's folders, lowest first: a module may import its own folder or a lower one, never a higher
#: one. The modules directly in firered_core/ (pipeline, parts, loading, cli, tiny) sit on top of all.
CORE_RANK = ["model", "formats", "runtime", "sampling", "editing", "agent"]
CORE_TOP = {"__init__", "__main__", "pipeline", "parts", "loading", "cli", "tiny", "tiny_tokenizer"}


def core_rank(parts: tuple[str, ...] | list[str]) -> int:
    """Rank of a module or folder inside firered_core, given its path parts below firered_core/."""
    return CORE_RANK.index(parts[0]) if parts[0] in CORE_RANK else len(CORE_RANK)


def test_core_top_level_holds_only_the_entry_modules():
    top = {p.stem for p in (ROOT / "firered_core").glob("*.py")}
    assert top <= CORE_TOP, f"move {sorted(top - CORE_TOP)} into one of the folders {CORE_RANK}"
    folders = {p.name for p in (ROOT / "firered_core").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders <= set(CORE_RANK), f"unknown core folders {sorted(folders - set(CORE_RANK))}"


@pytest.mark.parametrize("path", py_files("firered_core"), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_lower_folders_never_import_higher_ones(path):
    here = path.relative_to(ROOT / "firered_core").with_suffix("").parts
    mine = core_rank(here)
    package = list(here[:-1])  # a package's __init__ resolves from its own folder, like a module in it
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        base = package[: len(package) - (node.level - 1)]
        target = base + (node.module.split(".") if node.module else [])
        targets = [target + [a.name] for a in node.names] if not node.module else [target]
        for t in targets:
            if not t:
                continue
            assert core_rank(t) <= mine, (
                f"{path.relative_to(ROOT)}:{node.lineno} imports {'.'.join(t)} from a higher layer "
                f"(order, lowest first: {CORE_RANK}, then the top-level modules)"
            )


@pytest.mark.parametrize("path", py_files("firered_core"), ids=lambda p: p.name)
def test_core_imports_heavy_libraries_only_where_used(path):
    for module, level, line in imports(path, top_level_only=True):
        if level == 0:
            assert module.split(".")[0] not in HEAVY, f"{path.name}:{line} imports {module} at module level"


@pytest.mark.parametrize("path", py_files("firered_trainer"), ids=lambda p: p.name)
def test_trainer_never_imports_nodes_or_comfyui(path):
    for module, level, line in imports(path):
        first = resolve(path, module, level)
        assert first not in COMFY and first != "nodes", f"{path.name}:{line} imports {module!r}"


@pytest.mark.parametrize("path", py_files("nodes"), ids=lambda p: p.name)
def test_nodes_import_the_core_relatively(path):
    # ComfyUI imports the pack under its folder name, and has a top-level `nodes` of its own
    for module, level, line in imports(path):
        if level == 0:
            assert module.split(".")[0] not in ("firered_core", "firered_trainer", "nodes"), f"{path.name}:{line}: use a relative import"


def test_pack_imports_under_any_folder_name_without_heavy_libraries(tmp_path):
    link = tmp_path / "ComfyUI-FireRed-Image-Edit-main"
    link.symlink_to(ROOT, target_is_directory=True)
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location(
            {str(link).replace('.', '_x_').replace('/', '_')!r}, {str(link / '__init__.py')!r},
            submodule_search_locations=[{str(link)!r}])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        assert isinstance(mod.NODE_CLASS_MAPPINGS, dict)
        assert mod.WEB_DIRECTORY == "./js"
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(HEAVY)!r})
        assert not heavy, heavy
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_requirements_never_list_torch():
    names = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    for n in names:
        base = n.split(";")[0].replace(" ", "")
        for bad in ("torch", "torchvision", "torchaudio", "xformers"):
            assert not (base == bad or base.startswith(bad + "=") or base.startswith(bad + ">") or base.startswith(bad + "<") or base.startswith(bad + "[") or base.startswith(bad + "~") or base.startswith(bad + "!")), n
