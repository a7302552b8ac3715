"""`codeqa`: LongBench-v2 CodeQA style. A repository-sized context of real Python source
(the standard library of the running interpreter), and a 4-option multiple-choice
question built from the AST of the files in it: which function calls X, which class
defines method Y, a parameter's default value, a class's base class, which file defines
a function. Exactly one option is right, and every option names something that is in the
context, so the question cannot be answered without reading the code.
"""

from __future__ import annotations

import ast
import random
import re

from rlm_train.errors import UserError
from rlm_train.tasks import corpora
from rlm_train.tasks.common import letters
from rlm_train.tasks.family import Family
from rlm_train.tasks.scoring import score_mcq

MIN_TOKENS = 1000  # one small module

FILE_HEADER = "# ==== File: {path} ===="
KINDS = ("calls", "defines_method", "default_value", "base_class", "defining_file")
ANSWER_FORMAT = 'Answer with "The correct answer is (X)", where X is A, B, C or D.'


FuncNode = ast.FunctionDef | ast.AsyncFunctionDef


def _functions(tree: ast.Module) -> list[tuple[str, FuncNode]]:
    """(qualified name, node) of module-level functions and methods of top-level classes."""
    out: list[tuple[str, FuncNode]] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((node.name, node))
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out.append((f"{node.name}.{item.name}", item))
    return out


def _classes(tree: ast.Module) -> list[ast.ClassDef]:
    return [n for n in tree.body if isinstance(n, ast.ClassDef)]


def called_names(func: ast.AST) -> set[str]:
    """Names a function calls: `f(...)` gives f, `obj.f(...)` gives f."""
    names = set()
    for node in ast.walk(func):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name):
                names.add(node.func.id)
            elif isinstance(node.func, ast.Attribute):
                names.add(node.func.attr)
    return names


def method_names(cls: ast.ClassDef) -> set[str]:
    return {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def defaults(func: FuncNode) -> dict[str, str]:
    """Parameter -> source text of its default, for simple literal defaults."""
    args = func.args
    positional = args.posonlyargs + args.args
    pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
    pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
    out = {}
    for arg, node in pairs:
        if isinstance(node, ast.Constant) or (
            isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.Constant)
        ):
            out[arg.arg] = ast.unparse(node)
    return out


def _opt(path: str, qualname: str) -> str:
    return f"{qualname} (in {path})"


def _pick_files(rng: random.Random, target_chars: int, split: str) -> list[str]:
    pool = corpora.source_files(split)
    order = rng.sample(range(len(pool)), len(pool))
    chosen: list[str] = []
    total = 0
    for i in order:
        rel, size = pool[i]
        extra = size + len(FILE_HEADER) + len(rel) + 2
        if total + extra <= target_chars:
            chosen.append(rel)
            total += extra
        if target_chars - total < corpora.MIN_FILE_CHARS or len(chosen) >= 5000:
            break
    return chosen


def _function_table(trees: dict[str, ast.Module]) -> dict[tuple[str, str], list[FuncNode]]:
    """(path, qualified name) -> its definitions (a property getter and setter share a name)."""
    table: dict[tuple[str, str], list[FuncNode]] = {}
    for path, tree in trees.items():
        for qual, node in _functions(tree):
            table.setdefault((path, qual), []).append(node)
    return table


def _class_table(trees: dict[str, ast.Module]) -> dict[tuple[str, str], list[ast.ClassDef]]:
    table: dict[tuple[str, str], list[ast.ClassDef]] = {}
    for path, tree in trees.items():
        for cls in _classes(tree):
            table.setdefault((path, cls.name), []).append(cls)
    return table


Question = tuple[str, list[str]]  # (question, options with the right one first)
FunctionKey = tuple[str, str]  # (path, qualified name)


def _question(rng: random.Random, kind: str, focus: str, trees: dict[str, ast.Module]) -> Question | None:
    """(question, options with the right one first) or None when `kind` cannot be built here."""
    funcs = _function_table(trees)
    mine = sorted(k for k in funcs if k[0] == focus)
    if kind not in _QUESTIONS:
        raise ValueError(kind)
    return _QUESTIONS[kind](rng, focus, trees, funcs, mine)


def _q_calls(rng: random.Random, focus: str, trees: dict[str, ast.Module],
             funcs: dict[FunctionKey, list[FuncNode]], mine: list[FunctionKey]) -> Question | None:
    calls: dict[FunctionKey, set[str]] = {k: set().union(*(called_names(f) for f in nodes)) for k, nodes in funcs.items()}
    if not mine:
        return None
    right = rng.choice(mine)
    callees = sorted(n for n in calls[right] if len(n) > 3 and not n.startswith("__"))
    if not callees:
        return None
    callee = rng.choice(callees)
    wrong = sorted(k for k in funcs if callee not in calls[k])
    if len(wrong) < 3:
        return None
    options = [right] + rng.sample(wrong, 3)
    return f"Which of these functions calls `{callee}`?", [_opt(p, q) for p, q in options]


def _q_defines_method(rng: random.Random, focus: str, trees: dict[str, ast.Module],
                      funcs: dict[FunctionKey, list[FuncNode]], mine: list[FunctionKey]) -> Question | None:
    classes = _class_table(trees)
    methods: dict[FunctionKey, set[str]] = {k: set().union(*(method_names(c) for c in nodes)) for k, nodes in classes.items()}
    candidates = sorted(k for k in classes if k[0] == focus and methods[k])
    if not candidates:
        return None
    right = rng.choice(candidates)
    method = rng.choice(sorted(methods[right]))
    wrong = sorted(k for k in classes if method not in methods[k])
    if len(wrong) < 3:
        return None
    options = [right] + rng.sample(wrong, 3)
    text = f"Which of these classes defines a method named `{method}` in its own body?"
    return text, [_opt(p, q) for p, q in options]


def _q_default_value(rng: random.Random, focus: str, trees: dict[str, ast.Module],
                     funcs: dict[FunctionKey, list[FuncNode]], mine: list[FunctionKey]) -> Question | None:
    # Only names defined once, so "the default" is unambiguous.
    tables = [(k, defaults(nodes[0])) for k in mine if len(nodes := funcs[k]) == 1]
    candidates = [(k, table) for k, table in tables if table]
    if not candidates:
        return None
    (path, qual), table = rng.choice(candidates)
    param = rng.choice(sorted(table))
    right = table[param]
    values = sorted({v for nodes in funcs.values() for f in nodes for v in defaults(f).values() if len(v) < 40})
    values += [v for v in ("None", "True", "False", "0", "1", "-1", "''", "()") if v not in values]
    pool = [v for v in values if v != right]
    options = [right] + rng.sample(pool, 3)
    return f"What is the default value of the parameter `{param}` of `{qual}` in {path}?", options


def _q_base_class(rng: random.Random, focus: str, trees: dict[str, ast.Module],
                  funcs: dict[FunctionKey, list[FuncNode]], mine: list[FunctionKey]) -> Question | None:
    classes = _class_table(trees)
    candidates = sorted(k for k, nodes in classes.items() if k[0] == focus and len(nodes) == 1 and nodes[0].bases)
    if not candidates:
        return None
    path, name = rng.choice(candidates)
    bases = [ast.unparse(b) for b in classes[(path, name)][0].bases]
    names = sorted({ast.unparse(b) for nodes in classes.values() for c in nodes for b in c.bases})
    names += [b for b in ("object", "Exception", "ValueError", "dict", "list", "ABC") if b not in names]
    pool = [b for b in names if b not in bases and len(b) < 60]
    options = [bases[0]] + rng.sample(pool, 3)
    return f"Which of these is a direct base class of `{name}` in {path}?", options


def _q_defining_file(rng: random.Random, focus: str, trees: dict[str, ast.Module],
                     funcs: dict[FunctionKey, list[FuncNode]], mine: list[FunctionKey]) -> Question | None:
    top = {p: {q for q, _ in _functions(t) if "." not in q} for p, t in trees.items()}
    others = sorted(p for p in trees if p != focus)
    if len(others) < 3:
        return None
    wrong = rng.sample(others, 3)
    # A name the focus file defines and none of the three other options does.
    names = sorted(q for q in top[focus] if not any(q in top[p] for p in wrong))
    if not names:
        return None
    name = rng.choice(names)
    return f"Which of these files defines a module-level function named `{name}`?", [focus] + wrong


_QUESTIONS = {"calls": _q_calls, "defines_method": _q_defines_method, "default_value": _q_default_value,
              "base_class": _q_base_class, "defining_file": _q_defining_file}


def generate(rng: random.Random, target_chars: int, split: str) -> dict:
    files = _pick_files(rng, target_chars, split)
    if not files:
        # The smallest files are ~2k characters; a tiny target still gets one.
        smallest = min(corpora.source_files(split), key=lambda f: f[1])[0]
        files = [smallest]
    # Parse a few files for the question (distractors must be checked against them);
    # a whole 1M-token context would take seconds to parse.
    sample = rng.sample(files, min(len(files), 4))
    trees = {p: t for p in sample if (t := corpora.parse_source(p)) is not None}
    built = None
    for _ in range(20):
        kind = rng.choice(KINDS)
        if trees:
            built = _question(rng, kind, rng.choice(sorted(trees)), trees)
        if built:
            break
    if not built:
        raise UserError(f"codeqa: no question could be built from the {len(files)} file(s) a {target_chars}-character "
                        "context holds; give codeqa a larger context_tokens (its questions compare several files)")
    text, options = built
    order = list(range(4))
    rng.shuffle(order)
    shown = [options[i] for i in order]
    answer = letters(4)[order.index(0)]
    choices = "\n".join(f"({letter}) {option}" for letter, option in zip(letters(4), shown))
    context = "\n\n".join(f"{FILE_HEADER.format(path=p)}\n{corpora.read_source(p)}" for p in files)
    query = (
        f"The context is the source code of {len(files)} Python files from a code base, each starting "
        f"with a line `{FILE_HEADER.format(path='<path>')}`.\n\nQuestion: {text}\n{choices}\n\n{ANSWER_FORMAT}"
    )
    return {
        "query": query,
        "context": context,
        "answer": answer,
        "meta": {"question_kind": kind, "files": len(files), "source": corpora.stdlib_version()},
    }


def score(task: dict, answer) -> float:
    """The letter chosen, LongBench-v2 style."""
    return score_mcq(task["answer"], answer)


_FILE = re.compile(r"^# ==== File: (.+) ====$", re.MULTILINE)


def split_keys(task: dict) -> dict:
    return {"file": _FILE.findall(task.get("context", ""))}


FAMILY = Family(name="codeqa", generate=generate, scorer="mcq", score=score, min_tokens=MIN_TOKENS,
                corpus_version=corpora.stdlib_version, split_keys=split_keys)
