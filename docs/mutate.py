"""A small mutation tester for the functions mutmut leaves alone (it skips decorated ones, such as the
@torch.no_grad() samplers): each mutant of the named functions, one at a time, in a copy of the checkout, against
the given tests. Killed means the tests failed (or ran past the timeout); survived means they passed.

    python docs/mutate.py utils.py NoiseSchedule.inpaint NoiseSchedule.invert -- tests/test_inpaint.py -k law

Mutations: comparisons flipped, arithmetic operators swapped, and/or swapped, `not` dropped, number constants +-1
(True/False flipped), statements dropped (a return returns None). The mutated file is written with ast.unparse."""
import argparse
import ast
import copy
import difflib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARE = {ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
           ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
BINARY = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
          ast.FloorDiv: ast.Div, ast.Mod: ast.Mult}


def functions(tree, names):
    """The function nodes named 'f' or 'Class.f' in a module."""
    found = {}
    for node in tree.body:
        for child in [node] + (node.body if isinstance(node, ast.ClassDef) else []):
            if isinstance(child, ast.FunctionDef):
                found[f"{node.name}.{child.name}" if child is not node else child.name] = child
    missing = set(names) - set(found)
    if missing:
        sys.exit(f"error: no function {', '.join(sorted(missing))}")
    return [found[n] for n in names]


def variants(node):
    """(description, edit) for each mutation of this one node; edit(node) changes it in place."""
    out = []
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in COMPARE:
                out.append((f"{type(op).__name__} -> {COMPARE[type(op)].__name__}",
                            lambda n, i=i: n.ops.__setitem__(i, COMPARE[type(n.ops[i])]())))
    elif isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        out.append((f"{type(node.op).__name__} -> {BINARY[type(node.op)].__name__}",
                    lambda n: setattr(n, "op", BINARY[type(n.op)]())))
    elif isinstance(node, ast.BoolOp):
        out.append(("and <-> or", lambda n: setattr(n, "op", ast.Or() if isinstance(n.op, ast.And) else ast.And())))
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        out.append((f"{node.value} -> {not node.value}", lambda n: setattr(n, "value", not n.value)))
    elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        for d in (1, -1):
            out.append((f"{node.value!r} -> {node.value + d!r}", lambda n, d=d: setattr(n, "value", n.value + d)))
    return out


def statements(func):
    """(parent list, index) of every statement inside func (its docstring aside)."""
    out = []
    for node in ast.walk(func):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list):
                for i, stmt in enumerate(block):
                    docstring = node is func and i == 0 and isinstance(stmt, ast.Expr) and isinstance(
                        getattr(stmt, "value", None), ast.Constant)
                    if isinstance(stmt, ast.stmt) and not docstring:
                        out.append((id(node), field, i))
    return out


def mutants(source, names):
    """(description, line, mutated source) for every mutant of the named functions."""
    tree = ast.parse(source)
    out = []
    for f_index, func in enumerate(functions(tree, names)):
        def twin():  # a copy of the module, and a map from func's nodes to the copy's
            mutated = copy.deepcopy(tree)
            return mutated, dict(zip(map(id, ast.walk(func)), ast.walk(functions(mutated, names)[f_index])))
        for node in ast.walk(func):
            for description, edit in variants(node):
                mutated, nodes = twin()
                edit(nodes[id(node)])
                out.append((f"{names[f_index]}: {description}", node.lineno, ast.unparse(mutated)))
        for owner, field, i in statements(func):
            mutated, nodes = twin()
            block = getattr(nodes[owner], field)
            stmt = block[i]
            block[i] = ast.Return(ast.Constant(None)) if isinstance(stmt, ast.Return) and stmt.value else ast.Pass()
            out.append((f"{names[f_index]}: drop `{ast.unparse(stmt).splitlines()[0][:60]}`", stmt.lineno,
                        ast.unparse(ast.fix_missing_locations(mutated))))
    return sorted(out, key=lambda m: m[1])


def copy_checkout(dest):
    """The tracked and untracked-but-not-ignored files of the checkout, copied to dest."""
    files = subprocess.run(["git", "-C", ROOT, "ls-files", "-co", "--exclude-standard"], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.dirname(os.path.join(dest, name)) or dest, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))


def run_tests(where, tests, timeout):
    """'killed', 'survived' or 'timeout' (pytest in where, stopping at the first failure)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                            *tests], cwd=where, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    return "survived" if r.returncode == 0 else "killed"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    p.add_argument("functions", nargs="+", help="f or Class.f")
    p.add_argument("--sample", type=int, default=0, help="test this many mutants, drawn at random (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help="test these mutants (numbers as --list gives them, comma-separated)")
    p.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    p.add_argument("--show", type=int, help="print this mutant's change, run nothing")
    argv = sys.argv[1:]
    tests = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    source = open(os.path.join(ROOT, args.file)).read()
    found = mutants(source, args.functions)
    chosen = sorted(random.Random(args.seed).sample(range(len(found)), args.sample)) if 0 < args.sample < len(
        found) else range(len(found))
    chosen = [int(i) for i in args.only.split(",")] if args.only else chosen
    if args.show is not None:
        before, after = ast.unparse(ast.parse(source)).splitlines(), found[args.show][2].splitlines()
        print("\n".join(difflib.unified_diff(before, after, args.file, args.file, n=0, lineterm="")))
        return
    if args.list:
        for i in chosen:
            print(f"{i:3d}  line {found[i][1]}  {found[i][0]}")
        return
    with tempfile.TemporaryDirectory() as where:
        copy_checkout(where)
        start = time.time()
        assert run_tests(where, tests, None) == "survived", "the tests fail on the unmutated code"
        timeout = 4 * (time.time() - start) + 20
        counts = {}
        for i in chosen:
            description, line, text = found[i]
            with open(os.path.join(where, args.file), "w") as f:
                f.write(text)
            result = run_tests(where, tests, timeout)
            counts[result] = counts.get(result, 0) + 1
            print(f"{i:3d}  line {line}  {result:8s}  {description}", flush=True)
        caught = counts.get("killed", 0) + counts.get("timeout", 0)
        print(f"{caught} of {len(chosen)} mutants caught ({100 * caught / max(1, len(chosen)):.0f}%): {counts}")


if __name__ == "__main__":
    main()
