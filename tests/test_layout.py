"""The layout shows the architecture: actors grouped by role, small modules, imports one way."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = {"stepping", "coordination", "storage", "shm"}


def modules(*folders):
    for folder in folders:
        yield from glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)


def imported(path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_actors_are_grouped_by_role():
    top = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "actors", "*.py"))}
    assert top == {"__init__.py", "errors.py", "options.py"}
    packages = {d for d in os.listdir(os.path.join(ROOT, "actors"))
                if os.path.isfile(os.path.join(ROOT, "actors", d, "__init__.py"))}
    assert packages == GROUPS


def test_no_module_is_over_450_lines():
    long = {os.path.relpath(p, ROOT): n for p in modules("actors", "collectors", "scripts")
            if (n := len(open(p).read().splitlines())) > 450}
    assert long == {}


def test_imports_point_one_way():
    for path in modules("actors"):
        assert not any(m == "collectors" or m.startswith("collectors.") for m in imported(path)), path
    for path in modules("collectors", "actors"):
        assert not any(m.split(".")[0].startswith("bench") for m in imported(path)), path


def test_the_benchmark_scripts_do_not_import_each_other_in_a_cycle():
    scripts = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, "scripts", "*.py"))}
    graph = {name: {m.split(".")[0] for m in imported(p)} & set(scripts) for name, p in scripts.items()}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])

    assert [n for n in graph if reaches(n, n)] == []
