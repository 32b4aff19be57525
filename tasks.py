"""Tasks for RLVR: prompts plus a verifiable reward on the decoded response.

- countdown: TinyZero protocol (the paper's headline task, Section 4 of PAPER.md): reach a target
  with + - * / using each given number exactly once. Instances are generated, seeded, solvable.
- gsm8k: grade-school word problems, JSONL with `question` and `answer` ending in `#### <number>`.
- math: MATH500-style `\\boxed{}` answers, checked with `math-verify` when it is installed.

Model output is untrusted: nothing here calls eval/exec. Countdown answers go through a small
whitelisted recursive-descent parser over exact fractions, with bounded length, digits and depth.
Project defaults for Countdown: the answer is the text between the last '</answer>' and the
'<answer>' before it; it may hold only ASCII digits, + - * / ( ) and whitespace (no '=', no '.',
no unary minus, no leading zeros), so e.g. '(12+5)*3 = 51' earns the 0.1 format reward.
"""
import json
import operator
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Optional

# ----------------------------------------------------------------------------------------------
# Project defaults, kept in one place.
COUNTDOWN_FORMAT_REWARD = 0.1   # TinyZero: an <answer> that is malformed, uses wrong numbers or misses
COUNTDOWN_MAX_NUMBER = 99       # operands drawn from 1..99
COUNTDOWN_MAX_TARGET = 100      # targets are integers in 1..100
COUNTDOWN_TRAIN_SIZE = 20_000   # PAPER.md Section 4: 20,000 train / 512 test instances
COUNTDOWN_TEST_SIZE = 512
MAX_ANSWER_CHARS = 256          # longer <answer> contents are rejected before parsing
MAX_NUMBER_DIGITS = 9           # bounds every integer literal the parser will build
MAX_PAREN_DEPTH = 32            # bounds recursion in the parser: far below Python's limit
MAX_BOXED_CHARS = 1_000         # longest \boxed{...} content scanned for GSM8K / math
LAST_NUMBER_WINDOW = 10_000     # extract="last_number" looks at this many trailing characters
ASCII_DIGITS = "0123456789"     # str.isdigit()/int() also accept e.g. '١٢' or fullwidth digits
ANALYSIS_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

# ----------------------------------------------------------------------------------------------
# Task container


@dataclass
class Example:
    prompt: str
    answer: Any  # countdown: {"numbers": [...], "target": int}; gsm8k / math: gold answer string


@dataclass
class Task:
    name: str
    train: list
    test: list
    reward_fn: Callable[[str, Example], float]
    prompt_style: str
    solution_fn: Optional[Callable] = None  # (example, rng) -> worked response text, for SFT warm-up

    def reward(self, response: str, example: Example) -> float:
        return self.reward_fn(response, example)

    def correct(self, response: str, example: Example) -> bool:
        return self.reward_fn(response, example) >= 1.0

    def worked_solution(self, example: Example, rng: Optional[random.Random] = None) -> str:
        if self.solution_fn is None:
            raise ValueError(f"task {self.name!r} has no procedurally generated worked solutions")
        return self.solution_fn(example, rng)

# ----------------------------------------------------------------------------------------------
# Safe Countdown arithmetic: a whitelisted recursive-descent parser over exact fractions.
#   expr := term (('+' | '-') term)* ; term := factor (('*' | '/') factor)* ; factor := INT | '(' expr ')'
# There is no unary minus (TinyZero's eval() allowed one): every Countdown target is positive, and
# any expression with negations has a negation-free twin whose value is its absolute value
# (|a| - |b| or |b| - |a| replaces a + b with mixed signs), so nothing reachable is lost.


class EquationError(ValueError):
    """The text is not a well-formed Countdown equation."""


def _tokenize(text: str) -> list:
    if len(text) > MAX_ANSWER_CHARS:
        raise EquationError(f"equation longer than {MAX_ANSWER_CHARS} characters")
    tokens, i = [], 0
    while i < len(text):
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c in "+-*/()":
            tokens.append(c)
            i += 1
        elif c in ASCII_DIGITS:
            j = i
            while j < len(text) and text[j] in ASCII_DIGITS:
                j += 1
            digits = text[i:j]
            if len(digits) > MAX_NUMBER_DIGITS:
                raise EquationError(f"number with more than {MAX_NUMBER_DIGITS} digits")
            if len(digits) > 1 and digits[0] == "0":
                raise EquationError(f"number with a leading zero: {digits}")
            tokens.append(int(digits))
            i = j
        else:
            raise EquationError(f"character {c!r} is not allowed (digits, + - * / ( ) and spaces only)")
    return tokens


class _Parser:
    def __init__(self, tokens: list):
        self.tokens, self.pos, self.numbers = tokens, 0, []

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self):
        tok = self.peek()
        self.pos += 1
        return tok

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.factor(depth)
            if op == "/" and rhs == 0:
                raise EquationError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def factor(self, depth: int) -> Fraction:
        tok = self.take()
        if isinstance(tok, int):
            self.numbers.append(tok)
            return Fraction(tok)
        if tok == "(":
            if depth >= MAX_PAREN_DEPTH:
                raise EquationError(f"parentheses nested deeper than {MAX_PAREN_DEPTH}")
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise EquationError("unbalanced parentheses")
            return value
        raise EquationError(f"expected a number or '(' but got {tok!r}")


def parse_equation(equation: str) -> tuple:
    """Parse and evaluate exactly. Returns (value: Fraction, numbers used in order); raises EquationError."""
    parser = _Parser(_tokenize(equation))
    value = parser.expr(0)
    if parser.pos != len(parser.tokens):
        raise EquationError(f"unexpected {parser.peek()!r} after a complete expression")
    return value, parser.numbers


def extract_answer(response: str) -> Optional[str]:
    """Contents of the last complete <answer>...</answer> block (linear time, any response size)."""
    end = response.rfind("</answer>")
    start = response.rfind("<answer>", 0, end) if end >= 0 else -1
    return None if start < 0 else response[start + len("<answer>"):end]


def countdown_reward(response: str, numbers: list, target: int) -> float:
    """TinyZero reward: 0 without an answer, 0.1 if malformed / wrong numbers / wrong value, else 1."""
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    try:
        value, used = parse_equation(answer)
    except EquationError:
        return COUNTDOWN_FORMAT_REWARD
    if Counter(used) != Counter(numbers) or value != target:
        return COUNTDOWN_FORMAT_REWARD
    return 1.0

# ----------------------------------------------------------------------------------------------
# Countdown solver, worked solutions and instance generator

_ATOM, _PRODUCT, _SUM = 2, 1, 0  # precedence of a sub-expression's outermost operator
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


@dataclass(frozen=True)
class _Node:
    value: Fraction
    expr: str      # minimal-parenthesis equation text
    prec: int
    steps: tuple   # intermediate results, e.g. ("12+5=17", "17*3=51")


def _operand(value: Fraction) -> str:
    return str(value) if value.denominator == 1 and value >= 0 else f"({value})"  # '8/(8/3)', not '8/8/3'


def _join(a: _Node, op: str, b: _Node) -> _Node:
    left = f"({a.expr})" if op in "*/" and a.prec == _SUM else a.expr
    right_needs = {"+": False, "-": b.prec == _SUM, "*": b.prec == _SUM, "/": b.prec != _ATOM}[op]
    right = f"({b.expr})" if right_needs else b.expr
    value = _OPS[op](a.value, b.value)
    step = f"{_operand(a.value)}{op}{_operand(b.value)}={value}"
    return _Node(value, left + op + right, _SUM if op in "+-" else _PRODUCT, a.steps + b.steps + (step,))


def _candidates(a: _Node, b: _Node, integer_only: bool) -> list:
    pairs = [(a, "+", b), (a, "*", b), (a, "-", b), (b, "-", a)]
    pairs += [(x, "/", y) for x, y in ((a, b), (b, a)) if y.value != 0]
    nodes = [_join(x, op, y) for x, op, y in pairs]
    if integer_only:
        nodes = [n for n in nodes if n.value.denominator == 1 and n.value >= 0]
    return nodes


def _search(items: list, target: Fraction, integer_only: bool, rng) -> Optional[_Node]:
    if len(items) == 1:
        return items[0] if items[0].value == target else None
    pairs = [(i, j) for i in range(len(items)) for j in range(i + 1, len(items))]
    if rng is not None:
        rng.shuffle(pairs)
    for i, j in pairs:
        rest = [x for k, x in enumerate(items) if k not in (i, j)]
        nodes = _candidates(items[i], items[j], integer_only)
        if rng is not None:
            rng.shuffle(nodes)
        for node in nodes:
            found = _search(rest + [node], target, integer_only, rng)
            if found is not None:
                return found
    return None


def _solve_node(numbers: list, target: int, rng=None) -> Optional[_Node]:
    # Prefer solutions whose intermediate results are non-negative integers: they read like the
    # worked steps a small model can learn; fall back to any exact rational solution.
    leaves = [_Node(Fraction(n), str(n), _ATOM, ()) for n in numbers]
    for integer_only in (True, False):
        node = _search(leaves, Fraction(target), integer_only, rng)
        if node is not None:
            return node
    return None


def solve_countdown(numbers: list, target: int, rng: Optional[random.Random] = None) -> Optional[str]:
    """An equation using each number exactly once that equals target (exact arithmetic), or None.
    rng=None searches in a fixed order (deterministic); an rng varies which solution is found."""
    node = _solve_node(numbers, target, rng)
    return None if node is None else node.expr


def countdown_worked_solution(numbers: list, target: int, rng: Optional[random.Random] = None,
                              prompt_style: str = "tinyzero") -> str:
    """A full response in the answer format: '12+5=17, 17*3=51</think> <answer>(12+5)*3</answer>'.
    It continues the prompt: the tinyzero prompt already ends in '<think>', the compact one does not,
    so compact responses open with '<think>'. The tokenizer's EOS is not included."""
    if prompt_style not in ("tinyzero", "compact"):
        raise ValueError(f"countdown prompt_style must be 'tinyzero' or 'compact', got {prompt_style!r}")
    node = _solve_node(numbers, target, rng)
    if node is None:
        raise ValueError(f"Countdown instance {numbers} -> {target} has no solution")
    opening = "<think>" if prompt_style == "compact" else ""
    return f"{opening}{', '.join(node.steps)}</think> <answer>{node.expr}</answer>"


def _random_instance(rng: random.Random, num_numbers: int, max_number: int, max_target: int) -> tuple:
    # Combine the numbers in a random order with random integer-valued operations; keep the result
    # if it is a target in range. The construction itself is a solution, so every instance is solvable.
    while True:
        numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
        values = list(numbers)
        while len(values) > 1:
            a = values.pop(rng.randrange(len(values)))
            b = values.pop(rng.randrange(len(values)))
            big, small = max(a, b), min(a, b)
            options = [a + b, big - small, a * b] + ([big // small] if small and big % small == 0 else [])
            values.append(rng.choice(options))
        if 1 <= values[0] <= max_target:
            return numbers, values[0]


def generate_countdown(n: int, seed, num_numbers: int = 4, max_number: int = COUNTDOWN_MAX_NUMBER,
                       max_target: int = COUNTDOWN_MAX_TARGET, exclude: frozenset = frozenset()) -> list:
    """n distinct solvable instances [(numbers, target)]; instances whose (sorted numbers, target)
    is in exclude are skipped. Deterministic for a seed (int or str)."""
    rng, seen, out, attempts = random.Random(seed), set(exclude), [], 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 10_000:
            raise ValueError(f"could only generate {len(out)} of {n} distinct Countdown instances with "
                             f"max_number={max_number}, max_target={max_target}; ask for fewer or "
                             "widen the ranges")
        numbers, target = _random_instance(rng, num_numbers, max_number, max_target)
        key = (tuple(sorted(numbers)), target)
        if key not in seen:
            seen.add(key)
            out.append((numbers, target))
    return out


def countdown_prompt(numbers: list, target: int, prompt_style: str = "tinyzero") -> str:
    """tinyzero: base-model User/Assistant framing with <think>/<answer> tags (TinyZero's structure,
    our wording); compact: '12 5 3 -> 51\\n' for tiny models trained from scratch."""
    if prompt_style == "compact":
        return f"{' '.join(map(str, numbers))} -> {target}\n"
    if prompt_style != "tinyzero":
        raise ValueError(f"countdown prompt_style must be 'tinyzero' or 'compact', got {prompt_style!r}")
    return ("This is a conversation between a User and an Assistant. The User poses a problem, and the "
            "Assistant first reasons about it privately and then gives the User the answer.\n"
            f"User: Make an equation equal to {target} from the numbers {list(numbers)}. You may use "
            "+, -, * and /, and every number must be used exactly once. Write your reasoning inside "
            "<think> </think> and only the final equation inside <answer> </answer>, "
            "e.g. <answer>(7 - 4) * 2</answer>.\n"
            "Assistant: Let me solve this step by step.\n<think>")


def make_countdown(seed: int = 0, num_numbers: int = 4, n_train: int = COUNTDOWN_TRAIN_SIZE,
                   n_test: int = COUNTDOWN_TEST_SIZE, max_number: int = COUNTDOWN_MAX_NUMBER,
                   max_target: int = COUNTDOWN_MAX_TARGET, prompt_style: str = "tinyzero") -> Task:
    if num_numbers not in (3, 4):
        raise ValueError(f"countdown num_numbers must be 3 or 4, got {num_numbers}")
    countdown_prompt([1], 1, prompt_style)  # validates prompt_style before the generation work
    test = generate_countdown(n_test, f"{seed}:test", num_numbers, max_number, max_target)
    test_keys = frozenset((tuple(sorted(n)), t) for n, t in test)
    train = generate_countdown(n_train, f"{seed}:train", num_numbers, max_number, max_target, test_keys)

    def to_examples(instances):
        return [Example(countdown_prompt(n, t, prompt_style), {"numbers": n, "target": t})
                for n, t in instances]

    def reward(response, ex):
        return countdown_reward(response, ex.answer["numbers"], ex.answer["target"])

    def solution(ex, rng):
        return countdown_worked_solution(ex.answer["numbers"], ex.answer["target"], rng, prompt_style)

    return Task("countdown", to_examples(train), to_examples(test), reward, prompt_style, solution)

# ----------------------------------------------------------------------------------------------
# GSM8K / math answers

_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")   # ASCII only: \d would match '١'
_THOUSANDS = re.compile(r"(?<=[0-9]),(?=[0-9]{3}(?![0-9]))")
_NUMBER_IN_TEXT = re.compile(r"-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?")
_MAX_NUMBER_CHARS = 40


def extract_boxed(text: str) -> Optional[str]:
    """Contents of the last \\boxed{...}, matching nested braces; None if absent or unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, min(len(text), i + MAX_BOXED_CHARS)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def parse_number(text: str) -> Optional[Fraction]:
    """Exact value of a plain numeric answer, or None. Drops '$', '%', thousands commas, LaTeX
    spacing and a trailing '.', so '1,000' == '1000' == '$1000.00' == '1000.'."""
    s = re.sub(r"\\[!,;: ]|\\\$|\\%|[$%\s]", "", text)
    s = _THOUSANDS.sub("", s).rstrip(".")
    frac = re.fullmatch(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", s) or re.fullmatch(r"([^/]*)/([^/]*)", s)
    if frac:
        num, den = parse_number(frac.group(1)), parse_number(frac.group(2))
        return None if num is None or not den else num / den
    if len(s) > _MAX_NUMBER_CHARS or not _NUMBER.fullmatch(s):
        return None
    return Fraction(s)


def _last_number(text: str) -> Optional[str]:
    # Only the tail is scanned, so a huge response costs no more than a short one; a match cut
    # by the window's start is dropped rather than read as a shorter number.
    start = max(0, len(text) - LAST_NUMBER_WINDOW)
    found = list(_NUMBER_IN_TEXT.finditer(text, start))
    if found and start > 0 and found[0].start() == start and text[start - 1] in ASCII_DIGITS + ",.-":
        found = found[1:]
    return found[-1].group() if found else None


def gsm8k_reward(response: str, gold: str, extract: str = "boxed") -> float:
    """1.0 if the last \\boxed{} (extract='boxed') or the last number in the response
    (extract='last_number') equals the gold number exactly, else 0.0."""
    if extract == "boxed":
        pred = extract_boxed(response)
    elif extract == "last_number":
        pred = _last_number(response)
    else:
        raise ValueError(f"extract must be 'boxed' or 'last_number', got {extract!r}")
    value, gold_value = (parse_number(pred) if pred is not None else None), parse_number(gold)
    return float(value is not None and value == gold_value)


def normalize_math_answer(text: str) -> str:
    """String normal form used when math-verify is not installed."""
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    s = re.sub(r"\\left|\\right|\\[!,;: ]|\\\$|\\%|[$%\s]|\^\{?\\circ\}?", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"^[a-zA-Z]=", "", s)
    return _THOUSANDS.sub("", s).rstrip(".")


_warned_no_math_verify = False


def math_equal(pred: str, gold: str) -> bool:
    """Equivalence via math-verify when installed, else normalised numbers/strings (warned once)."""
    global _warned_no_math_verify
    try:
        from math_verify import parse, verify
    except ImportError:
        if not _warned_no_math_verify:
            warnings.warn("math-verify is not installed: math answers are compared as normalised "
                          "numbers/strings, which misses equivalent forms (pip install math-verify)")
            _warned_no_math_verify = True
        p, g = normalize_math_answer(pred), normalize_math_answer(gold)
        pv, gv = parse_number(p), parse_number(g)
        return pv == gv if pv is not None and gv is not None else p == g
    # math-verify returns no parse / False on bad LaTeX itself; its signal-based timeout raises
    # outside the main thread, which is left to surface rather than silently score 0.
    return bool(verify(parse(f"\\boxed{{{gold}}}"), parse(f"\\boxed{{{pred}}}")))


def math_reward(response: str, gold: str) -> float:
    pred = extract_boxed(response)
    return float(pred is not None and math_equal(pred, gold))


def split_context_question(text: str) -> tuple:
    """Project default for the analysis prompt: the last sentence is the Question, the rest Context."""
    parts = re.split(r"(?<=[.!?])\s+(?=\S)", text.strip())
    return " ".join(parts[:-1]), parts[-1]


def analysis_prompt(problem: str) -> str:
    """PAPER.md analysis format: 'System: ... Context: ... Question: ...', then an 'Answer:' cue."""
    context, question = split_context_question(problem)
    lines = [f"System: {ANALYSIS_SYSTEM}"] + ([f"Context: {context}"] if context else [])
    return "\n".join(lines + [f"Question: {question}", "Answer:"])

# ----------------------------------------------------------------------------------------------
# Loading GSM8K / math data


def read_jsonl(path) -> list:
    """[(where, dict)] for the non-blank lines of a JSONL file; where = 'FILE, line N' for errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task data file {path} does not exist (expected a JSONL file)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path}, line {lineno}", row))
    if not rows:
        raise ValueError(f"task data file {path} contains no examples")
    return rows


def _field(row: dict, names: tuple, where: str) -> str:
    for name in names:
        if isinstance(row.get(name), (str, int, float)):
            return str(row[name])
    raise ValueError(f"{where}: missing field {' or '.join(map(repr, names))}")


def _gsm8k_example(row: dict, where: str) -> Example:
    question, answer = _field(row, ("question",), where), _field(row, ("answer",), where)
    gold = answer.rsplit("####", 1)[-1].strip()
    if parse_number(gold) is None:
        raise ValueError(f"{where}: field 'answer' must end with '#### <number>', got ...{answer[-40:]!r}")
    return Example(analysis_prompt(question), gold)


def _math_example(row: dict, where: str) -> Example:
    question = _field(row, ("problem", "question"), where)
    gold = row.get("answer")
    if gold is None and isinstance(row.get("solution"), str):
        gold = extract_boxed(row["solution"])
    if gold is None:
        raise ValueError(f"{where}: missing field 'answer' (or a 'solution' containing \\boxed{{...}})")
    return Example(analysis_prompt(question), str(gold))


def _from_hub(task: str, name: str, config: Optional[str], split: str) -> list:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"task {task!r} needs data=<path to a JSONL file> (or a dict / directory with "
                         f"train and test files): the `datasets` package is not installed, so {name} "
                         "cannot be loaded from the Hugging Face hub") from None
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise ValueError(f"could not load {name} from the Hugging Face hub ({e}); download it and "
                         "pass data=<path to a JSONL file>") from e
    return [(f"{name} {split} row {i}", dict(row)) for i, row in enumerate(rows)]


def _split_sources(data) -> dict:
    """data: a dict {'train': path, 'test': path}, a directory holding train.jsonl and test.jsonl,
    or one file, which then serves as both splits (evaluation or small demos)."""
    if isinstance(data, dict):
        missing = {"train", "test"} - set(data)
        if missing:
            raise ValueError(f"data dict needs 'train' and 'test' paths; missing {sorted(missing)}")
        return {split: data[split] for split in ("train", "test")}
    path = Path(data)
    if path.is_dir():
        return {split: path / f"{split}.jsonl" for split in ("train", "test")}
    return {"train": path, "test": path}


def make_gsm8k_or_math(name: str, data=None, extract: str = "boxed", prompt_style: str = "analysis") -> Task:
    if prompt_style != "analysis":
        raise ValueError(f"{name} prompt_style must be 'analysis', got {prompt_style!r}")
    if extract not in ("boxed", "last_number"):
        raise ValueError(f"extract must be 'boxed' or 'last_number', got {extract!r}")
    if name == "math" and extract != "boxed":
        raise ValueError("the math task reads answers from \\boxed{} only; drop extract=")
    to_example = _gsm8k_example if name == "gsm8k" else _math_example
    if data is None and name == "gsm8k":
        rows = {split: _from_hub(name, "openai/gsm8k", "main", split) for split in ("train", "test")}
    elif data is None:  # MATH-500 has only a test split; it then serves as both
        rows = dict.fromkeys(("train", "test"), _from_hub(name, "HuggingFaceH4/MATH-500", None, "test"))
    else:
        rows = {split: read_jsonl(path) for split, path in _split_sources(data).items()}
    splits = {split: [to_example(row, where) for where, row in r] for split, r in rows.items()}
    if name == "gsm8k":
        def reward(response, ex):
            return gsm8k_reward(response, ex.answer, extract)
    else:
        def reward(response, ex):
            return math_reward(response, ex.answer)
    return Task(name, splits["train"], splits["test"], reward, prompt_style)


def make_task(name: str, data=None, seed: int = 0, **kwargs) -> Task:
    """'countdown' (generated, seeded; kwargs of make_countdown), 'gsm8k' (kwargs extract,
    prompt_style) or 'math' (kwarg prompt_style); data is a JSONL path / dict / directory."""
    if name == "countdown":
        if data is not None:
            raise ValueError("countdown instances are generated from the seed; pass data=None")
        return make_countdown(seed=seed, **kwargs)
    if name in ("gsm8k", "math"):
        return make_gsm8k_or_math(name, data, **kwargs)
    raise ValueError(f"unknown task {name!r}; expected 'countdown', 'gsm8k' or 'math'")
