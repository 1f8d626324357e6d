"""The front-end extension in js/, checked without a browser: every file parses as an ES module,
every node id, widget name, model folder, ui key and server event it names exists on the Python
side, and it patches nothing global (every hook is scoped to the pack's own nodes)."""

import importlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JS_FILES = sorted((ROOT / "js").rglob("*.js"))

#: node ids the JS handles whose Python node has not landed yet -> why. An id leaves this table
#: when its node lands (test_pending_ids_are_still_missing fails until it does).
PENDING: dict[str, str] = {}


def js_source() -> str:
    return "\n".join(p.read_text() for p in JS_FILES)


def const(name: str) -> str:
    """The string value of ``const NAME = "..."`` in the extension."""
    m = re.search(rf'const {name} = "([^"]*)";', js_source())
    assert m, f"js/ defines no string constant {name}"
    return m.group(1)


def referenced_node_ids() -> set[str]:
    return set(re.findall(r'["\'`](FireRed[A-Za-z0-9_]+)["\'`]', js_source())) | set(
        re.findall(r"^\s+(FireRed[A-Za-z0-9_]+):", js_source(), re.M)
    )


def file_info_nodes() -> dict[str, tuple[str, str]]:
    found = re.findall(r'(FireRed\w+): \{ widget: "(\w+)", folder: "(\w+)" \}', js_source())
    assert found, "no FILE_INFO_NODES table in js/"
    return {node: (widget, folder) for node, widget, folder in found}


def test_there_is_an_extension():
    assert JS_FILES, "js/ holds no .js file"
    # ComfyUI serves every .js file under WEB_DIRECTORY and the front end imports each one: exactly one
    # of them registers the extension, the others only define what it imports
    registering = [p.name for p in JS_FILES if "app.registerExtension(" in p.read_text()]
    assert registering == ["firered.js"], registering


def test_the_modules_import_what_the_others_export():
    """Every ``import {...} from "./x.js"`` names a file of js/ and names only what that file exports (a
    wrong name is a SyntaxError in the browser that ``node --check`` does not see); the front end's
    own modules are imported from ``../../scripts/``."""
    exports = {
        p.relative_to(ROOT / "js").as_posix(): set(
            re.findall(r"^export (?:async )?(?:const|let|function|class) (\w+)", p.read_text(), re.M)
        )
        for p in JS_FILES
    }
    for path in JS_FILES:
        for names, source in re.findall(r'^import \{([^}]*)\} from "([^"]+)";', path.read_text(), re.M):
            wanted = {n.strip() for n in names.split(",") if n.strip()}
            if source.startswith("../../scripts/"):
                assert source in ("../../scripts/app.js", "../../scripts/api.js"), f"{path.name}: {source}"
                continue
            assert source.startswith("./"), f"{path.name} imports {source!r}: use a path relative to js/"
            target = (path.parent / source).resolve().relative_to(ROOT / "js").as_posix()
            assert target in exports, f"{path.name} imports {source!r}, which is not in js/"
            assert wanted <= exports[target], f"{path.name}: {source} does not export {sorted(wanted - exports[target])}"


def _balanced(src: str) -> str | None:
    """A small structural check used when Node.js is absent: brackets balance outside strings,
    template literals and comments. Returns what is wrong, or None."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[tuple[str, int]] = []
    i, n, line = 0, len(src), 1
    while i < n:
        c = src[i]
        if c == "\n":
            line += 1
        if src.startswith("//", i):
            i = src.find("\n", i)
            i = n if i < 0 else i
            continue
        if src.startswith("/*", i):
            j = src.find("*/", i + 2)
            if j < 0:
                return f"line {line}: unterminated comment"
            line += src.count("\n", i, j)
            i = j + 2
            continue
        if c in "\"'`":
            j = i + 1
            while j < n and src[j] != c:
                if src[j] == "\\":
                    j += 1
                elif c != "`" and src[j] == "\n":
                    return f"line {line}: unterminated string"
                elif c == "`" and src.startswith("${", j):  # nested expressions: skip to the matching }
                    depth, j = 1, j + 2
                    while j < n and depth:
                        depth += {"{": 1, "}": -1}.get(src[j], 0)
                        j += 1
                    continue
                j += 1
            if j >= n:
                return f"line {line}: unterminated string"
            line += src.count("\n", i, j)
            i = j + 1
            continue
        if c in "([{":
            stack.append((c, line))
        elif c in ")]}":
            if not stack or stack[-1][0] != pairs[c]:
                return f"line {line}: unexpected {c!r}"
            stack.pop()
        i += 1
    return f"line {stack[-1][1]}: {stack[-1][0]!r} never closed" if stack else None


@pytest.mark.parametrize("path", JS_FILES, ids=lambda p: p.name)
def test_js_parses_as_an_es_module(path, tmp_path):
    node = shutil.which("node") or shutil.which("nodejs")
    if node:
        mjs = tmp_path / (path.stem + ".mjs")  # .mjs: checked as an ES module, as the browser loads it
        mjs.write_text(path.read_text())
        out = subprocess.run([node, "--check", str(mjs)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{path.name}: {out.stderr}"
    else:
        problem = _balanced(path.read_text())
        assert problem is None, f"{path.name}: {problem}"


def test_python_fallback_check_finds_breakage():
    assert _balanced("const a = `x${ {b: 1}.b }`; f(a, [1, 2]); // )") is None
    assert _balanced("function f() { return [1, 2; }") is not None
    assert _balanced('const s = "never closed;\n') is not None


def test_referenced_node_ids_exist(pack):
    ids = referenced_node_ids()
    assert {"FireRedCompare", "FireRedModelLoader"} <= ids, ids
    missing = sorted(ids - set(pack.NODE_CLASS_MAPPINGS) - set(PENDING))
    assert not missing, f"js/ names node ids the pack does not define: {missing}"


def test_pending_ids_are_still_missing(pack):
    landed = sorted(set(PENDING) & set(pack.NODE_CLASS_MAPPINGS))
    assert not landed, f"{landed} landed: take them out of PENDING so their hooks are checked"


def test_file_info_widgets_and_folders_exist(pack):
    FOLDERS = importlib.import_module(f"{pack.__name__}.nodes.routes").FOLDERS
    for node_id, (widget, folder) in file_info_nodes().items():
        assert folder in FOLDERS, f"{node_id}: folder {folder!r} is not served by /firered/file_info"
        cls = pack.NODE_CLASS_MAPPINGS.get(node_id)
        assert cls is not None, f"{node_id} is not a node of the pack"
        spec = cls.INPUT_TYPES()
        inputs = {**spec.get("required", {}), **spec.get("optional", {})}
        assert widget in inputs, f"{node_id} has no input {widget!r} (inputs: {list(inputs)})"


def test_ui_keys_and_events_match_the_python_side():
    py = "\n".join(p.read_text() for d in ("nodes", "firered_trainer") for p in sorted((ROOT / d).rglob("*.py")))
    assert f'"{const("COMPARE_OUTPUT")}"' in py, "no node sends the comparison ui output the widget reads"
    assert const("FILE_INFO_ROUTE") in (ROOT / "nodes" / "routes.py").read_text()
    for key in ("LOSS_OUTPUT", "TRAIN_EVENT"):
        if const("TRAIN_NODE") in PENDING:
            continue
        assert f'"{const(key)}"' in py, f"no Python code sends {const(key)!r}"


def test_hooks_are_scoped_to_the_pack():
    src = js_source()
    # no global monkey-patching of LiteGraph / the app, no deprecated menu patching
    for bad in ("LGraphNode.prototype", "LGraphCanvas.prototype", "getExtraMenuOptions", "app.graphToPrompt ="):
        assert bad not in src, f"js/ patches {bad}"
    # node prototypes are only touched for node types whose id starts with the pack's prefix
    assert const("PACK_PREFIX") == "FireRed"
    assert "name.startsWith(PACK_PREFIX)" in src
    assert "nodeCreated(" not in src and "loadedGraphNode(" not in src  # hooks that see every node
    # panels never enter saved workflows or prompts
    assert "serialize: false" in src and "widget.serialize = false" in src
