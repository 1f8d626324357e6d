"""Importing the pack never breaks ComfyUI's start-up: a missing dependency disables the nodes that
need it, with one log line each, and the import itself succeeds."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_import(blocked: list[str]) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        import importlib.util, logging, sys
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        for name in {blocked!r}:
            sys.modules[name] = None  # "import name" now raises ModuleNotFoundError
        spec = importlib.util.spec_from_file_location("SomePack", {str(ROOT / '__init__.py')!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["SomePack"] = mod
        spec.loader.exec_module(mod)
        print("NODES", sorted(mod.NODE_CLASS_MAPPINGS))
        print("DISABLED", sorted(sys.modules["SomePack.nodes"].DISABLED))
        """
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent, timeout=120)


def test_without_torch_the_pack_still_imports_and_says_why():
    out = run_import(["torch"])
    assert out.returncode == 0, out.stderr
    assert "NODES []" in out.stdout
    lines = [line for line in out.stderr.splitlines() if "FireRed:" in line]
    assert lines and all("'torch'" in line for line in lines), out.stderr
    assert len(lines) == len(set(lines))  # one line per disabled feature, not a traceback


def test_a_missing_optional_package_disables_only_its_feature():
    out = run_import(["gguf", "yaml", "bitsandbytes", "peft"])
    assert out.returncode == 0, out.stderr
    assert "FireRedModelLoader" in out.stdout and "FireRedSampler" in out.stdout
    assert "Traceback" not in out.stderr


def test_every_listed_node_module_exists_and_a_missing_one_is_said():
    import re

    src = (ROOT / "nodes" / "__init__.py").read_text()
    listed = re.search(r"MODULES = \(([^)]*)\)", src).group(1)
    names = re.findall(r'"(\w+)"', listed)
    assert names and all((ROOT / "nodes" / f"{n}.py").is_file() for n in names), names
    # a file of the pack gone missing (a broken install) is one log line, not silence
    code = textwrap.dedent(
        f"""
        import importlib.util, logging, sys
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        spec = importlib.util.spec_from_file_location("SomePack", {str(ROOT / '__init__.py')!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["SomePack"] = mod
        spec.loader.exec_module(mod)
        nodes = sys.modules["SomePack.nodes"]
        nodes.DISABLED.clear()
        nodes._load("gone")
        print("DISABLED", sorted(nodes.DISABLED))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "DISABLED ['gone']" in out.stdout and "nodes/gone.py is not in this install" in out.stderr
