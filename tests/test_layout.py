"""The house rules, read from the source: the import graph between modules, and docs that
name only commands, options and make targets that exist."""
import ast
import functools
import os
import re
import subprocess
import sys
import typing

import click
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("competition", "infra", "model", "train", "export", "predict", "report", "bench")


def _modules() -> dict[str, str]:
    """module name -> file, for every module of the product."""
    found = {name: os.path.join(ROOT, f"{name}.py") for name in ("muge_cli", "muge_docs")}
    for package in PACKAGES:
        for name in sorted(os.listdir(os.path.join(ROOT, package))):
            if name.endswith(".py"):
                module = package if name == "__init__.py" else f"{package}.{name[:-3]}"
                found[module] = os.path.join(ROOT, package, name)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the product modules it imports anywhere in its source (top level or inside a
    function: a late import is still a dependency)."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for name in names:  # the longest product module that the name starts with
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    edges.add(name)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "model.config" in graph["train.config"] and "model.dual" in graph["model.factory"]  # the graph is read
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_stages_import_only_what_they_need():
    graph = import_graph()
    for module, edges in graph.items():
        stage = module.split(".")[0]
        if stage in ("train", "export", "predict", "report", "competition", "infra"):
            assert not {e for e in edges if e.startswith("bench")}, f"{module} imports a bench"
        if stage == "infra":  # the machinery every stage shares: nothing of the project's but itself
            assert all(e.split(".")[0] == "infra" for e in edges), f"{module} imports {edges}"
        if stage == "competition":  # the task: on top of infra alone
            assert all(e.split(".")[0] in ("competition", "infra") for e in edges), f"{module} imports {edges}"
        if stage in ("predict", "report"):  # ONNX Runtime and numpy: never torch's stages
            assert all(e.split(".")[0] in ("competition", "infra", "predict", "report") for e in edges), (module, edges)
        if stage in ("model", "export"):  # the model package, and export built on it: never the training harness
            assert not {e for e in edges if e.split(".")[0] == "train"}, f"{module} imports {sorted(edges)}"
        if stage == "model":
            assert all(e.split(".")[0] in ("competition", "infra", "model") for e in edges), (module, edges)
        if stage == "export":
            across = {e for e in edges if e.split(".")[0] in ("predict", "report")}
            assert across <= {"predict.runtime", "predict.manifest"}, f"{module} imports {sorted(across)}"
    for bench in NON_TRAINING_BENCHES:  # what measures export and predict builds models as export does
        assert not {e for e in graph[bench] if e.split(".")[0] == "train"}, f"{bench} imports {sorted(graph[bench])}"


# the house, bottom up: a package imports only from packages below its own level
LEVELS = {"infra": 0, "competition": 1, "model": 2, "predict": 2, "train": 3, "export": 3, "report": 3, "bench": 4,
          "muge_cli": 5, "muge_docs": 6}


def package_arrows(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(importer, imported) between top-level packages, from the module graph (the AST's imports)."""
    return {(m.split(".")[0], e.split(".")[0]) for m, edges in graph.items() for e in edges
            if m.split(".")[0] != e.split(".")[0]}


def test_no_package_imports_from_a_level_above_its_own():
    arrows = package_arrows(import_graph())
    assert ("export", "model") in arrows and ("competition", "infra") in arrows  # the graph is read
    up = sorted((a, b) for a, b in arrows if LEVELS[b] >= LEVELS[a])
    assert up == [], f"imports that climb (or cross a level sideways): {up}"


def test_the_level_check_sees_an_arrow_back_up():
    graph = {"infra.io": {"competition.errors"}, "competition.errors": set()}
    assert [(a, b) for a, b in package_arrows(graph) if LEVELS[b] >= LEVELS[a]] == [("infra", "competition")]


NON_TRAINING_BENCHES = ("bench.export", "bench.predict", "bench.topk", "bench.tsv", "bench.memory", "bench.shapes",
                        "bench.table")


# -- the docs name only what exists -------------------------------------------------------------------
DOCS = ["README.md"] + [os.path.join("docs", n) for n in sorted(os.listdir(os.path.join(ROOT, "docs")))
                        if n.endswith(".md")] if os.path.isdir(os.path.join(ROOT, "docs")) else ["README.md"]


def _fenced_lines(path: str):
    """(line number, text) of each line inside ``` fences, continuation lines joined."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        lines = f.read().splitlines()
    inside, held, start = False, "", 0
    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("```"):
            inside, held = not inside, ""
            continue
        if not inside:
            continue
        if not held:
            start = number
        held += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            yield start, held.strip()
            held = ""


def _make_targets() -> set[str]:
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        return {m.group(1) for line in f if (m := re.match(r"^([a-z][\w-]*):", line))}


def _commands():
    """(path, line, the tokens of one `muge ...` or `make ...` command) in the docs' fences."""
    for path in DOCS:
        for number, text in _fenced_lines(path):
            text = text.split("#", 1)[0]  # a comment after the command
            for part in re.split(r"&&|;|\|(?=\s)", text):
                tokens = part.split()
                while tokens and ("=" in tokens[0] and not tokens[0].startswith("-")):
                    tokens = tokens[1:]  # VAR=value before the command
                if tokens and tokens[0].endswith(("/muge", "muge")) or tokens and tokens[0] == "make":
                    yield path, number, tokens


def test_every_documented_command_exists():
    from muge_cli import cli

    targets = _make_targets()
    seen = 0
    for path, number, tokens in _commands():
        where = f"{path}:{number}: {' '.join(tokens)}"
        seen += 1
        if tokens[0] == "make":
            for word in tokens[1:]:
                if "=" not in word and not word.startswith("-"):
                    assert word in targets, f"{where}: no make target {word!r}"
            continue
        command, words = cli, tokens[1:]
        while isinstance(command, click.Group) and words and not words[0].startswith("-"):
            name = words[0].split("|")[0]
            sub = command.get_command(click.Context(command), name)
            if sub is None:
                break
            command, words = sub, words[1:]
        assert command is not cli, f"{where}: no subcommand"
        options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}
        for flag in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", " ".join(words)):
            assert flag in options, f"{where}: `{command.name}` has no option {flag}"
    assert seen >= 10  # the docs do show commands


def test_the_cli_reference_is_generated_from_the_commands():
    """docs/cli.md ends with every command's --help; `make docs` regenerates it."""
    import muge_docs

    path = os.path.join(ROOT, muge_docs.REFERENCE)
    with open(path, encoding="utf-8") as f:
        committed = f.read()
    assert committed == muge_docs.cli_reference(muge_docs.reference_head(path)), (
        f"{muge_docs.REFERENCE} is stale: run `make docs` and commit it")
    for option in ("--train-queries", "--parity-gallery", "--threads", "--thumb-size", "--mask-ratio"):
        assert f"  {option}" in committed, option


def test_the_config_reference_is_generated_from_the_schema(monkeypatch):
    """docs/config.md lists every config key with its type, default and the schema's own comment;
    `make docs` regenerates it, and a field without a comment cannot be generated."""
    import dataclasses

    import muge_docs
    import train.config as schema

    with open(os.path.join(ROOT, muge_docs.CONFIG_REFERENCE), encoding="utf-8") as f:
        committed = f.read()
    assert committed == muge_docs.config_reference(), f"{muge_docs.CONFIG_REFERENCE} is stale: run `make docs`"
    keys = re.findall(r"^\| `([a-z_.]+)` \|", committed, re.M)

    def flat(cls, prefix=""):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            yield from flat(hint, f"{prefix}{f.name}.") if dataclasses.is_dataclass(hint) else [prefix + f.name]

    assert keys == list(flat(schema.Config)) and "`data.augment.word_dropout`" in committed
    assert "drops characters instead" in committed.split("`data.augment.word_dropout`")[1].split("\n")[0]
    import inspect

    import model.config

    real = inspect.getsource
    for module, line, bare_line, field in (
            (schema, "    eps: float = 1e-6                  # AdamW's epsilon", "    eps: float = 1e-6",
             "TrainConfig.eps"),
            (model.config, "    head_dropout: float = 0.1          # dropout inside the mlp head",
             "    head_dropout: float = 0.1", "ModelConfig.head_dropout")):
        bare = real(module).replace(line, bare_line)
        assert bare != real(module)
        monkeypatch.setattr(inspect, "getsource", lambda m, module=module, bare=bare: bare if m is module else real(m))
        with pytest.raises(ValueError, match=f"{field} has no comment"):
            muge_docs.config_reference()
    # a comment continued one column off would be cut at its first line: refused, naming the line
    shifted = real(schema).replace("\n                                       # ones) drops characters",
                                   "\n                                        # ones) drops characters")
    assert shifted != real(schema)
    monkeypatch.setattr(inspect, "getsource", lambda m: shifted if m is schema else real(m))
    with pytest.raises(ValueError, match=r"config.py:\d+: Augment.word_dropout's comment goes on in another column"):
        muge_docs.config_reference()


@pytest.mark.parametrize("cpus", [1, 16])
def test_the_cli_reference_does_not_depend_on_the_machine(tmp_path, cpus):
    """The reference rendered in a process that sees 1 or 16 CPUs (os.cpu_count and the affinity
    set patched through a sitecustomize.py) is the committed one: a default that follows the
    machine is shown by its rule, so `make test` is green on every machine."""
    import muge_docs

    (tmp_path / "sitecustomize.py").write_text(f"import os\nos.cpu_count = lambda: {cpus}\n"
                                               f"os.sched_getaffinity = lambda pid: set(range({cpus}))\n")
    code = ("import os, muge_docs; assert os.cpu_count() == %d; "
            "print(muge_docs.cli_reference(muge_docs.reference_head()))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])}
    out = subprocess.run([sys.executable, "-c", code % cpus], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(os.path.join(ROOT, muge_docs.REFERENCE), encoding="utf-8") as f:
        assert out.stdout == f.read() + "\n"


def test_the_readme_code_map_names_every_module():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    block = text.split("## Code map", 1)[1].split("```")[1]
    entries, package = {}, None
    for line in block.splitlines():
        if line[:1].strip():
            package = line.split()[0].rstrip("/")
        if package:
            entries[package] = entries.get(package, "") + line
    for package in PACKAGES:
        files = sorted(n for n in os.listdir(os.path.join(ROOT, package)) if n.endswith(".py") and n != "__init__.py")
        missing = [n for n in files if not re.search(rf"(?<![\w.]){re.escape(n)}", entries.get(package, ""))]
        assert not missing, f"README's code map does not name {package}/{', '.join(missing)}"


@pytest.mark.parametrize("path", DOCS)
def test_docs_link_only_to_files_that_exist(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert os.path.exists(os.path.join(ROOT, os.path.dirname(path), target)), f"{path}: broken link {target}"


@functools.cache
def _heading_anchors(path: str) -> frozenset[str]:
    """GitHub's anchors of a Markdown file's headings (code blocks skipped, repeats numbered)."""
    found, seen, in_code = set(), {}, False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("```"):
                in_code = not in_code
            elif not in_code and re.match(r"#{1,6} ", line):
                slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
                seen[slug] = seen.get(slug, 0) + 1
    return frozenset(found)


@pytest.mark.parametrize("path", DOCS)
def test_docs_link_only_to_headings_that_exist(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
        linked = os.path.join(ROOT, os.path.dirname(path), target) if target else os.path.join(ROOT, path)
        if "://" in target or not linked.endswith(".md"):
            continue
        assert anchor in _heading_anchors(linked), f"{path}: no heading for #{anchor} in {target or path}"
