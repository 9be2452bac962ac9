"""The project's import structure, read from the source (ast; imports inside functions count too): the root modules
import each other without a cycle, none imports an entry point (train.py, evaluate.py), and bench/ imports nothing
from tests/."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ENTRY_POINTS = ('train', 'evaluate')
# cycles allowed for now, each with why it exists; the test fails once one has ended, so that its exception goes with it
KNOWN_CYCLES = []


def modules(folder: str) -> dict:
    """Module name -> path of each .py file directly in `folder`."""
    return {name[:-3]: os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.endswith('.py')}


def imported_names(path: str) -> set:
    """The top-level names of every module `path` imports, anywhere in the file."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split('.')[0])
    return names


def import_graph(root: str) -> dict:
    """Root module -> the other root modules it imports (a module importing itself, as
    `python preference_datasets.py` does for its own DataError, is no cycle)."""
    found = modules(root)
    return {name: (imported_names(path) & set(found)) - {name} for name, path in found.items()}


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan's algorithm), each a set."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def entry_point_imports(graph: dict) -> list:
    """(module, entry point) for each root module that imports train.py or evaluate.py."""
    return sorted((name, entry) for name, imports in graph.items() for entry in ENTRY_POINTS if entry in imports)


def bench_imports_from_tests(root: str) -> list:
    """(bench file, tests/ module) for each import in bench/ of a module that only tests/ holds."""
    tests, elsewhere = set(modules(os.path.join(root, 'tests'))) | {'tests'}, set(modules(root))
    bench = modules(os.path.join(root, 'bench'))
    return sorted((os.path.basename(path), name) for path in bench.values()
                  for name in imported_names(path) & tests - elsewhere - set(bench))


def test_no_import_cycle_among_root_modules():
    found = cycles(import_graph(ROOT))
    assert [c for c in found if c not in KNOWN_CYCLES] == [], f'import cycles among the root modules: {found}'
    assert [c for c in KNOWN_CYCLES if c not in found] == [], 'a known cycle has ended: remove it from KNOWN_CYCLES'


def test_no_root_module_imports_an_entry_point():
    assert entry_point_imports(import_graph(ROOT)) == []


def test_bench_imports_nothing_from_tests():
    assert bench_imports_from_tests(ROOT) == []


def test_the_checks_find_what_they_look_for(tmp_path):
    """A cycle through a function-level import, an entry point imported, a bench script importing tests' helpers."""
    for folder in ('tests', 'bench'):
        os.makedirs(tmp_path / folder)
    files = {'train.py': 'import a\n', 'a.py': 'import b\n', 'b.py': 'def f():\n    import a\n    from train import x\n',
             'tests/helpers.py': '', 'bench/bench_x.py': 'def g():\n    from helpers import compose_config\n'}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    graph = import_graph(str(tmp_path))
    assert cycles(graph) == [{'a', 'b', 'train'}]
    assert entry_point_imports(graph) == [('b', 'train')]
    assert bench_imports_from_tests(str(tmp_path)) == [('bench_x.py', 'helpers')]
