"""Tasks for RLVR: prompts plus a verifiable reward on the decoded response.

- countdown: the paper's headline task (Section 4 of PAPER.md): reach a target with + - * / using
  each given number exactly once, scored by TinyZero's rule (`countdown_reward`). Instances are
  generated here, seeded and solvable, with a fixed count of numbers (4 by default); TinyZero trains
  on the Countdown-Tasks-3to4 data set, which mixes 3- and 4-number problems. The 'tinyzero' prompt
  has TinyZero's structure (User/Assistant framing, <think>/<answer> tags, ending in
  'Assistant: Let me solve this step by step.\\n<think>') in our own wording.
- gsm8k: grade-school word problems, JSONL with `question` and `answer` ending in `#### <number>`.
- math: MATH500-style `\\boxed{}` answers, checked with `math-verify` when it is installed.

Model output is untrusted: nothing here calls eval/exec. A Countdown answer goes through a small
whitelisted recursive-descent parser with bounded length, digits, nesting depth and value size.

Countdown scoring is TinyZero's (verl/utils/reward_score/countdown.py in Jiayi-Pan/TinyZero):
only the text after the last '\\n' of the response counts; on it, the last <answer>...</answer>
(scanned left to right, non-overlapping, as re.finditer does) is the answer, stripped of
whitespace; no such block scores 0. The answer scores 1.0 if it is an arithmetic expression in
Python's syntax over digits, + - * / ( ) . and whitespace, whose digit runs are exactly the given
numbers (as a multiset) and whose value is within 1e-5 of the target; any other answer scores 0.1.
TinyZero first cuts the prompt off at "Assistant:"; `response` here is the response alone, which
scores the same for our prompts (the tinyzero prompt's last line holds no <answer>, the compact one
ends in a newline). Python-syntax consequences kept on purpose, because TinyZero's eval has them:
unary + and - ('-4+3*(1+2)', '--3'), '**' (power) and '//' (floor division) are accepted; a
decimal literal counts each digit run ('1.5' uses the numbers 1 and 5, '00.5' uses 0 and 5);
an integer with a leading zero ('03') is a Python syntax error and so scores 0.1, while '0' and
'00' are zero; '=' or any letter scores 0.1; between tokens only space, tab and form feed are
whitespace, and '\\r' only inside parentheses (other Unicode spaces are Python syntax errors).
Project defaults where we depart from TinyZero's eval (all score 0.1 here): answers longer than
MAX_ANSWER_CHARS, nesting (parentheses and right-nested '**') deeper than MAX_PAREN_DEPTH, a
literal with more than MAX_NUMBER_DIGITS significant digits, an exact value with more than
MAX_VALUE_BITS bits (TinyZero would compute 99**99**99 for ever). Values are exact fractions
(a power with a non-integer exponent, e.g. 4**(1/2), is a float as in Python) where TinyZero
rounds through floats after the first '/'; the two differ only when float rounding moves a value
across the edge of the 1e-5 band (an exact distance of 1e-5, or intermediates beyond 2**53).
"""
import json
import operator
import random
import re
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Optional

# ----------------------------------------------------------------------------------------------
# Project defaults, kept in one place.
COUNTDOWN_FORMAT_REWARD = 0.1   # TinyZero: an <answer> that is malformed, uses wrong numbers or misses
COUNTDOWN_TOLERANCE = 1e-5      # TinyZero: correct when |value - target| < 1e-5
COUNTDOWN_MAX_NUMBER = 99       # operands drawn from 1..99
COUNTDOWN_MAX_TARGET = 100      # targets are integers in 1..100
COUNTDOWN_TRAIN_SIZE = 20_000   # PAPER.md Section 4: 20,000 train / 512 test instances
COUNTDOWN_TEST_SIZE = 512
SEARCH_DEAD_ENDS = (1, 4)        # rejected chains before the solution in a 'search' worked solution
SEARCH_MAX_VALUE = 200          # no step of a rejected chain goes above this (arithmetic a tiny model learns)
SEARCH_NEAR = 40                # a rejected chain ends within this distance of the target, never on it
SEARCH_DRAWS = 200              # random chains drawn to find one near miss
MAX_ANSWER_CHARS = 256          # longer <answer> contents are rejected before parsing
MAX_NUMBER_DIGITS = 9           # bounds every integer literal the parser will build
MAX_PAREN_DEPTH = 32            # bounds recursion in the parser: far below Python's limit
MAX_VALUE_BITS = 4096           # bounds exact intermediate values (99**99 has 657 bits)
PYTHON_SPACES = " \t\f"          # what Python's tokenizer skips between tokens ('\r' inside parentheses)
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
# Safe Countdown arithmetic: a whitelisted recursive-descent parser for the part of Python's
# expression grammar that TinyZero's character set [digits + - * / ( ) . whitespace] can spell:
#   expr := term (('+' | '-') term)* ; term := unary (('*' | '/' | '//') unary)*
#   unary := ('+' | '-')* power ; power := atom ['**' unary] ; atom := NUMBER | '(' expr ')'
# NUMBER is a Python literal over ASCII digits and '.': '12', '0', '00', '1.5', '1.', '.5', '007.5'.


class EquationError(ValueError):
    """The text is not a well-formed Countdown equation."""


def _number_literal(text: str, i: int) -> tuple:
    """Python's maximal munch for a decimal literal at text[i]: (value, digit runs, end)."""
    def run(k):
        j = k
        while j < len(text) and text[j] in ASCII_DIGITS:
            j += 1
        return text[k:j], j
    whole, j = run(i)
    fraction, is_float = "", j < len(text) and text[j] == "."
    if is_float:
        fraction, j = run(j + 1)
    runs = [r for r in (whole, fraction) if r]
    if any(len(r.lstrip("0")) > MAX_NUMBER_DIGITS for r in runs):
        raise EquationError(f"number with more than {MAX_NUMBER_DIGITS} digits")
    if not is_float and len(whole) > 1 and whole[0] == "0" and whole.strip("0"):
        raise EquationError(f"integer with a leading zero: {whole} (a Python syntax error)")
    value = Fraction(int(whole or "0")) + (Fraction(int(fraction), 10 ** len(fraction)) if fraction else 0)
    return value, [int(r) for r in runs], j


def _tokenize(text: str) -> tuple:
    """(tokens, digit runs): tokens are Fractions and operator strings."""
    if len(text) > MAX_ANSWER_CHARS:
        raise EquationError(f"equation longer than {MAX_ANSWER_CHARS} characters")
    tokens, runs, i, depth = [], [], 0, 0
    while i < len(text):
        c = text[i]
        if c in PYTHON_SPACES or (c == "\r" and depth > 0):
            i += 1
        elif c in ASCII_DIGITS or (c == "." and i + 1 < len(text) and text[i + 1] in ASCII_DIGITS):
            value, number_runs, i = _number_literal(text, i)
            tokens.append(value)
            runs += number_runs
        elif text.startswith(("**", "//"), i):
            tokens.append(text[i:i + 2])
            i += 2
        elif c in "+-*/()":
            depth += {"(": 1, ")": -1}.get(c, 0)
            tokens.append(c)
            i += 1
        else:
            raise EquationError(f"character {c!r} is not allowed here (Python arithmetic over digits, "
                                "+ - * / ( ) and spaces only)")
    return tokens, runs


def _checked(value):
    if isinstance(value, Fraction) and max(value.numerator.bit_length(),
                                           value.denominator.bit_length()) > MAX_VALUE_BITS:
        raise EquationError(f"intermediate value with more than {MAX_VALUE_BITS} bits")
    return value


def _power(base, exponent):
    """Python's ** on exact values: integer exponents stay exact (bounded), others go to floats
    (complex for a negative base), as Fraction.__pow__ and Python's eval both do."""
    if isinstance(base, Fraction) and isinstance(exponent, Fraction) and exponent.denominator == 1:
        e = int(exponent)
        if base in (1, -1):  # any exponent, however large, is cheap
            return Fraction(1) if base == 1 or e % 2 == 0 else Fraction(-1)
        if base == 0:
            if e < 0:
                raise EquationError("0 raised to a negative power")
            return Fraction(int(e == 0))
        size = max(base.numerator.bit_length(), base.denominator.bit_length())
        if size * abs(e) > MAX_VALUE_BITS:
            raise EquationError(f"power with more than {MAX_VALUE_BITS} bits")
    return base ** exponent


def _floordiv(a, b):
    quotient = a // b  # Fraction // Fraction is an int: keep every exact value a Fraction
    return Fraction(quotient) if isinstance(quotient, int) else quotient


_BINARY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "//": _floordiv}


class _Parser:
    def __init__(self, tokens: list):
        self.tokens, self.pos = tokens, 0

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self):
        tok = self.peek()
        self.pos += 1
        return tok

    def binary(self, op, a, b):
        if op in ("/", "//") and b == 0:
            raise EquationError("division by zero")
        return _checked(_BINARY[op](a, b))

    def expr(self, depth: int):
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            value = self.binary(op, value, self.term(depth))
        return value

    def term(self, depth: int):
        value = self.unary(depth)
        while self.peek() in ("*", "/", "//"):
            op = self.take()
            value = self.binary(op, value, self.unary(depth))
        return value

    def unary(self, depth: int):
        negate = False
        while self.peek() in ("+", "-"):  # a loop, not recursion: '- - - 3' costs no stack
            negate ^= self.take() == "-"
        value = self.power(depth)
        return -value if negate else value

    def power(self, depth: int):
        base = self.atom(depth)
        if self.peek() != "**":
            return base
        self.take()
        if depth >= MAX_PAREN_DEPTH:
            raise EquationError(f"nested deeper than {MAX_PAREN_DEPTH}")
        return _checked(_power(base, self.unary(depth + 1)))  # right-associative: 2**3**2 = 2**9

    def atom(self, depth: int):
        tok = self.take()
        if isinstance(tok, Fraction):
            return tok
        if tok == "(":
            if depth >= MAX_PAREN_DEPTH:
                raise EquationError(f"parentheses nested deeper than {MAX_PAREN_DEPTH}")
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise EquationError("unbalanced parentheses")
            return value
        raise EquationError(f"expected a number or '(' but got {tok!r}")


def parse_equation(equation: str) -> tuple:
    """Parse and evaluate with Python's precedence. Returns (value, the literals' digit runs as
    ints, in order); value is a Fraction, or a float / complex after a non-integer power.
    Raises EquationError for anything TinyZero's eval would reject or we bound."""
    tokens, runs = _tokenize(equation)
    parser = _Parser(tokens)
    try:
        value = parser.expr(0)
    except (ArithmeticError, TypeError) as e:  # float overflow, complex // ..., as eval would raise
        raise EquationError(f"cannot evaluate: {e}") from None
    if parser.pos != len(parser.tokens):
        raise EquationError(f"unexpected {parser.peek()!r} after a complete expression")
    return value, runs


def extract_answer(response: str) -> Optional[str]:
    """TinyZero's extraction: on the response's last line (after the last newline), the last of the
    <answer>...</answer> blocks found left to right, stripped; None if there is none. Linear time."""
    line = response[response.rfind("\n") + 1:]
    found, pos = None, 0
    while (start := line.find("<answer>", pos)) >= 0:
        end = line.find("</answer>", start + len("<answer>"))
        if end < 0:
            break
        found, pos = line[start + len("<answer>"):end], end + len("</answer>")
    return None if found is None else found.strip()


def countdown_reward(response: str, numbers: list, target: int) -> float:
    """TinyZero's Countdown reward (module docstring): 0 without an <answer> block on the last line;
    1.0 if the answer uses each number exactly once and is within 1e-5 of target; else 0.1."""
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    try:
        value, used = parse_equation(answer)
    except EquationError:
        return COUNTDOWN_FORMAT_REWARD
    if sorted(used) != sorted(numbers) or not abs(value - target) < COUNTDOWN_TOLERANCE:
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


def _near_miss(numbers: list, target: int, rng: random.Random) -> Optional[_Node]:
    """A random chain of integer steps that uses every number, stays at or below SEARCH_MAX_VALUE and
    ends within SEARCH_NEAR of the target without reaching it (None after SEARCH_DRAWS draws)."""
    for _ in range(SEARCH_DRAWS):
        items = [_Node(Fraction(n), str(n), _ATOM, ()) for n in numbers]
        while len(items) > 1:
            a = items.pop(rng.randrange(len(items)))
            b = items.pop(rng.randrange(len(items)))
            steps = [n for n in _candidates(a, b, integer_only=True) if n.value <= SEARCH_MAX_VALUE]
            if not steps:
                break
            items.append(rng.choice(steps))
        if len(items) == 1 and items[0].value != target and abs(items[0].value - target) <= SEARCH_NEAR:
            return items[0]
    return None


def countdown_search_solution(numbers: list, target: int, rng: Optional[random.Random] = None,
                              prompt_style: str = "compact") -> str:
    """A worked search: chains of steps that are tried and rejected, then the one that reaches the
    target, then the answer:
    '<think>16-12=4, 18-4=14 no; 16+18=34, 34-12=22 no; 18-16=2, 12/2=6 yes</think> <answer>12/(18-16)</answer>'.
    Each chain uses every number. A rejected chain is a near miss: its values stay at or below
    SEARCH_MAX_VALUE and it ends within SEARCH_NEAR of the target without reaching it (' no;'); the
    accepted one reaches it (' yes'). 1 to 4 near misses are drawn (SEARCH_DEAD_ENDS, uniform); one
    that repeats an earlier chain, or an instance that has none, leaves a draw out, so 0 to 4 chains
    are rejected (over 300 instances: 7%, 24%, 36%, 24%, 9%). A verdict cannot be told from a chain's
    place: a model has to compare the chain's last value with the target, and searches on when it
    misses.
    That is what makes RL useful here: sampling tries other chains, and a correct verdict turns a
    lucky chain into a right answer. The response is several reasoning steps long (about 82 tokens
    with the byte-level tokenizer) and a few tokens decide it: the first step of each chain, the
    verdicts and the answer, which repeats the accepted chain. rng=None draws from a generator
    seeded by the instance (deterministic). Project default, not in the paper: the paper's Qwen3
    models write their own search; this is the short, regular form a model trained from scratch can
    learn in minutes. (Until 2026-12-03 the rejected chains were 2 or 3 random chains of any size,
    and plain GRPO learned nothing from them: docs/testbed.md.)"""
    if prompt_style not in ("tinyzero", "compact"):
        raise ValueError(f"countdown prompt_style must be 'tinyzero' or 'compact', got {prompt_style!r}")
    rng = random.Random(f"{numbers}->{target}") if rng is None else rng
    node = _solve_node(numbers, target, rng)
    if node is None:
        raise ValueError(f"Countdown instance {numbers} -> {target} has no solution")
    tried = []
    for _ in range(rng.randint(*SEARCH_DEAD_ENDS)):
        miss = _near_miss(numbers, target, rng)
        chain = None if miss is None else ", ".join(miss.steps)
        if chain is not None and chain not in tried:
            tried.append(chain)
    chains = [chain + " no;" for chain in tried] + [", ".join(node.steps) + " yes"]
    opening = "<think>" if prompt_style == "compact" else ""
    return f"{opening}{' '.join(chains)}</think> <answer>{node.expr}</answer>"


SOLUTION_STYLES = {"direct": countdown_worked_solution, "search": countdown_search_solution}


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
                   max_target: int = COUNTDOWN_MAX_TARGET, prompt_style: str = "tinyzero",
                   solution_style: str = "direct") -> Task:
    """solution_style: the worked solutions of the warm-up, 'direct' (the steps that reach the
    target) or 'search' (rejected tries first, `countdown_search_solution`)."""
    if num_numbers not in (3, 4):
        raise ValueError(f"countdown num_numbers must be 3 or 4, got {num_numbers}")
    if solution_style not in SOLUTION_STYLES:
        raise ValueError(f"countdown solution_style must be one of {sorted(SOLUTION_STYLES)}, got {solution_style!r}")
    write_solution = SOLUTION_STYLES[solution_style]
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
        return write_solution(ex.answer["numbers"], ex.answer["target"], rng, prompt_style)

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
