import gc
import json
import random
import re
import sys
import warnings
from collections import Counter
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tasks  # noqa: E402
from tasks import (EquationError, countdown_reward, countdown_search_solution, countdown_worked_solution,  # noqa: E402
                   extract_boxed, gsm8k_reward, make_task, parse_equation, parse_number, solve_countdown)


def answer(eq):
    return f"some thinking</think> <answer>{eq}</answer>"


# ---------------------------------------------------------------------------------------------- parser

@pytest.mark.parametrize("eq, value, used", [
    ("(12+5)*3", 51, [12, 5, 3]),
    ("12 + 5 * 3", 27, [12, 5, 3]),
    ("100 - 4 - 3 * 2", 90, [100, 4, 3, 2]),    # left-associative minus, * before -
    ("8 / (3 - 8 / 3)", 24, [8, 3, 8, 3]),       # needs exact fractions: 3 - 8/3 = 1/3
    ("7 / 2", Fraction(7, 2), [7, 2]),
    (" ( ( 4 ) ) ", 4, [4]),
    ("0", 0, [0]),
    ("00", 0, [0]),                              # Python: zeros only are a valid literal
    ("-1+2", 1, [1, 2]),                         # unary minus, as Python's eval (TinyZero) allows
    ("--3", 3, [3]),
    ("1++2", 3, [1, 2]),
    ("-2**2", -4, [2, 2]),                       # ** binds tighter than a unary minus on its left
    ("2**-1", Fraction(1, 2), [2, 1]),
    ("2**3**2", 512, [2, 3, 2]),                 # right-associative
    ("7//2", 3, [7, 2]),                         # floor division
    ("1.5*2", 3, [1, 5, 2]),                     # a decimal: both digit runs count as numbers
    ("007.5", Fraction(15, 2), [7, 5]),          # leading zeros are fine in a Python float
    (".5+1.", Fraction(3, 2), [5, 1]),
    ("(1+\r2)", 3, [1, 2]),                      # Python joins lines inside parentheses
])
def test_parse_known_values(eq, value, used):
    assert parse_equation(eq) == (value, used)


@pytest.mark.parametrize("eq", ["", "1+", "(1+2", "1+2)", "1 2", "2*/3", "()", "05+1", "07", "1/0",
                                "4/(2-2)", "1=1", "x+1", "١٢", "１２", "1234567890+1", "1 .5", "1.5.5", "...",
                                "(1)(2)", "2***3", "2///3", "2* *3", "1+\r2", "1\u00a0+2", "1\x0b+2", "0**-1",
                                "99**99**99", "0.5**99999", "-", "+"])
def test_parse_rejects(eq):
    with pytest.raises(EquationError):
        parse_equation(eq)


# ---------------------------------------------------------------------------------------------- reward table

@pytest.mark.parametrize("response, expected", [
    ("no tags at all: (12+5)*3", 0.0),
    ("<answer>(12+5)*3", 0.0),                           # never closed
    ("(12+5)*3</answer>", 0.0),                          # never opened
    (answer("(12+5)*3"), 1.0),
    (answer(" 3 * (5 + 12) "), 1.0),                     # any order, spaces
    (answer("(12+5)*3") + " trailing words", 1.0),
    (answer("12+5+3"), 0.1),                             # right numbers, misses the target
    (answer("(12+5)*4"), 0.1),                           # a number not in the list
    (answer("(12+12)*3"), 0.1),                          # 12 used twice, 5 missing
    (answer("17*3"), 0.1),                               # missing numbers
    (answer("(12+5)*3*1"), 0.1),                         # extra number
    (answer("(12+5)*3 = 51"), 0.1),                      # '=' is not allowed
    (answer(""), 0.1),
    (answer("(12+5)*3") + " <answer>12+5+3</answer>", 0.1),   # the last block counts
    (answer("12+5+3") + " <answer>(12+5)*3</answer>", 1.0),
])
def test_countdown_reward_table(response, expected):
    assert countdown_reward(response, [12, 5, 3], 51) == expected


# The issue's table (numbers [1, 2, 3, 4], target 5): before, the last block anywhere counted and
# a unary minus was refused, giving 1.0, 1.0, 1.0 and 0.1.
@pytest.mark.parametrize("response, expected", [
    ("...</think>\n<answer>(1+2)*3-4</answer>\nUser: Make an equation equal to 7", 0.0),
    ("...</think>\n<answer>\n(1+2)*3-4\n</answer>", 0.0),
    ("...<answer>(1+2)*3-4</answer>\nWait, let me re-check: 1+2", 0.0),
    ("...<answer>-4+3*(1+2)</answer>", 1.0),
])
def test_issue_table_tinyzero_last_line(response, expected):
    assert countdown_reward(response, [1, 2, 3, 4], 5) == expected


@pytest.mark.parametrize("eq, numbers, target, expected", [
    ("03+2", [3, 2], 5, 0.1),              # Python 3: a leading zero is a syntax error
    ("00+5", [0, 5], 5, 1.0),
    ("2**3-3", [2, 3, 3], 5, 1.0),         # eval's power
    ("11//2", [11, 2], 5, 1.0),            # eval's floor division
    ("2.5*2", [2, 5, 2], 5, 1.0),          # digit runs 2, 5, 2
    ("2.5*2", [2.5, 2], 5, 0.1),
    ("25**(1/2)", [25, 1, 2], 5, 1.0),     # a float power, as eval computes it
    ("5 = 5", [5, 5], 5, 0.1),
    ("5+1/100001", [5, 1, 100001], 5, 1.0),  # within 1e-5
    ("5+1/99999", [5, 1, 99999], 5, 0.1),
])
def test_python_syntax_as_tinyzero_scores_it(eq, numbers, target, expected):
    assert countdown_reward(answer(eq), numbers, target) == expected


def tinyzero_reference(response, numbers, target):
    """TinyZero's rule written out with re + eval, for strings this test generates itself."""
    blocks = re.findall(r"<answer>(.*?)</answer>", response.split("\n")[-1])
    if not blocks:
        return 0.0
    eq = blocks[-1].strip()
    if sorted(int(d) for d in re.findall(r"\d+", eq)) != sorted(numbers):
        return 0.1
    if not re.match(r"^[\d+\-*/().\s]+$", eq):
        return 0.1
    try:
        value = eval(eq, {"__builtins__": None}, {})  # noqa: S307 (test-generated, regex-filtered)
        return 1.0 if abs(value - target) < 1e-5 else 0.1
    except Exception:
        return 0.1


def random_equation(rng, numbers):
    """A random expression over numbers (each once), with Python quirks mixed in."""
    parts = [str(n) for n in numbers]
    while len(parts) > 1:
        a = parts.pop(rng.randrange(len(parts)))
        b = parts.pop(rng.randrange(len(parts)))
        op = rng.choice(["+", "-", "*", "/", "+", "-", "*", "//"])
        sep = rng.choice(["", "", " "])
        parts.append(f"({a}{sep}{op}{sep}{b})" if rng.random() < 0.6 else f"{a}{sep}{op}{sep}{b}")
    eq = parts[0]
    if rng.random() < 0.2:
        eq = rng.choice(["-", "- ", "--", "+"]) + eq
    return eq


def random_response(rng):
    numbers = [rng.randint(1, 20) for _ in range(rng.choice([3, 4]))]
    eq = random_equation(rng, numbers)
    quirk = rng.random()
    if quirk < 0.08:                         # a power with a small exponent
        numbers.append(2)
        eq = f"({eq})**2"
    elif quirk < 0.14:                       # a near-target term: t + 1/k, k on both sides of 1e5
        k = rng.choice([50_000, 99_999, 100_001, 200_000, 1_000_000])
        numbers += [1, k]
        eq = f"{eq}+1/{k}"
    elif quirk < 0.18:                       # a leading zero or a decimal point
        eq = rng.choice([f"0{eq}", f"{eq}.0", f"{eq}*1.5"])
    elif quirk < 0.22:
        eq = f"{eq} = {rng.randint(1, 50)}"
    try:  # aim the target at the value, so that near-misses and hits are common
        value = eval(eq, {"__builtins__": None}, {}) if re.match(r"^[\d+\-*/().\s]+$", eq) else None  # noqa: S307
        target = round(value)
    except Exception:  # syntax error, division by zero, no value
        target = rng.randint(1, 50)
    given = list(numbers)
    if rng.random() < 0.15:                  # wrong numbers: one changed, dropped or doubled
        i = rng.randrange(len(given))
        given[i:i + 1] = rng.choice([[given[i] + 1], [], [given[i], given[i]]])
    other = random_equation(rng, numbers)
    layout = rng.randrange(11)
    think = f"Let me try {other}, which gives something else.</think>"
    text = [
        f"{think} <answer>{eq}</answer>",                                          # plain
        f"{think}\n<answer>{eq}</answer>\nUser: Make an equation equal to {target}",  # answer, then more
        f"{think}\n<answer>\n{eq}\n</answer>",                                    # multi-line block
        f"{think} <answer>{other}</answer> <answer>{eq}</answer>",                  # several on the last line
        f"{think} <answer>{eq}</answer> <answer>{other}</answer>",
        f"{think} <answer>{eq}</answer> so the answer is {target}.",               # trailing text
        f"{think} the answer is {eq}",                                              # no block
        f"<answer>{eq}</answer>\nWait, let me re-check: {other}",                  # truncated re-check
        f"{think} <answer> {eq} </answer>\r",                                      # CRLF line ends
        f"{think} <answer>x<answer>{eq}</answer>",                                  # nested-looking
        f"{think}\n<answer>{eq}</answer>\n",                                        # trailing newline
    ][layout]
    return text, given, target


@pytest.mark.filterwarnings("ignore::SyntaxWarning")  # eval of "0(...)" in the reference
def test_matches_tinyzero_on_generated_responses():
    rng = random.Random(11)
    cases = [random_response(rng) for _ in range(600)]
    outcomes = Counter()
    for response, numbers, target in cases:
        expected = tinyzero_reference(response, numbers, target)
        assert countdown_reward(response, numbers, target) == expected, (response, numbers, target)
        outcomes[expected] += 1
    assert min(outcomes[0.0], outcomes[0.1], outcomes[1.0]) >= 50, outcomes


def test_reward_with_repeated_given_numbers():
    assert countdown_reward(answer("8/(3-8/3)"), [3, 3, 8, 8], 24) == 1.0
    assert countdown_reward(answer("8*3"), [3, 3, 8, 8], 24) == 0.1


UNTRUSTED = {
    "python code": "__import__('os').system('touch /tmp/pwned')",
    "power tower": "9**9**9**9",
    "deep nesting": "(" * 100_000 + "1" + ")" * 100_000,
    "1 MB": "1+" * 500_000 + "1",
    "many digits": "9" * 100_000,
    "division by zero": "12/(5-5)*3",
    "arabic-indic digits": "(١٢+5)*3",
    "fullwidth digits": "(１２+5)*3",
    "leading zeros": "(012+5)*3",
    "unknown numbers": "(12+6)*3-3",
    "decimal": "(12.0+5)*3",                  # digit runs 12, 0, 5, 3: a 0 too many
    "huge exponent": "(12+5)*3+0*999999999**999999999",
    "lambda": "(lambda: 51)()",
}


# What stops each untrusted answer: the parser's error (naming the limit it hit), or None where the
# equation is well formed and only its numbers are wrong.
REFUSED_BY = {
    "python code": "not allowed",
    "power tower": f"power with more than {tasks.MAX_VALUE_BITS} bits",
    "deep nesting": f"longer than {tasks.MAX_ANSWER_CHARS} characters",
    "1 MB": f"longer than {tasks.MAX_ANSWER_CHARS} characters",
    "many digits": f"longer than {tasks.MAX_ANSWER_CHARS} characters",
    "division by zero": "division by zero",
    "arabic-indic digits": "not allowed",
    "fullwidth digits": "not allowed",
    "leading zeros": "leading zero",
    "unknown numbers": None,
    "decimal": None,
    "huge exponent": f"power with more than {tasks.MAX_VALUE_BITS} bits",
    "lambda": "not allowed",
}
# Python lines an untrusted input may cost (any module, the first use of a regex compiling it
# included; measured: at most about 4,000). The loops the limits bound would run one line or more per
# character of a response: 100,000 to 1,000,000 here.
LINE_BUDGET = 20_000
# Bits of the largest exact power the tests let the code compute (the parser's own bound is
# MAX_VALUE_BITS = 4096; 9**9**9**9 would need about 1.2e9 bits of 9**387420489 first).
POWER_BITS = 1_000_000


class TooMuchWork(Exception):
    """Raised inside the code under test when it starts work past the bounds of these tests. Not an
    EquationError or ArithmeticError, so no handler of tasks.py swallows it."""


@contextmanager
def line_budget(limit=LINE_BUDGET):
    """Count the Python lines executed (every module) inside the block: the work, without a clock.
    The count is yielded as a one-element list; past the limit TooMuchWork is raised where the
    code runs (an exception from a trace function propagates into the traced frame)."""
    count = [0]

    def local(frame, event, arg):
        if event == "line":
            count[0] += 1
            if count[0] > limit:
                raise TooMuchWork(f"more than {limit} Python lines, in {frame.f_code.co_name} "
                                  f"({frame.f_code.co_filename}:{frame.f_lineno})")
        return local

    previous, collecting = sys.gettrace(), gc.isenabled()
    gc.disable()  # a collection would run other objects' finalizers inside the count
    sys.settrace(lambda frame, event, arg: local)
    try:
        yield count
    finally:
        sys.settrace(previous)
        if collecting:
            gc.enable()


@pytest.fixture
def bounded_powers(monkeypatch):
    """Fraction ** integer raises TooMuchWork before computing a result of more than POW_BITS bits
    (the big-int work runs in C, where no line is counted). Returns the list of exponents asked for."""
    asked, power = [], Fraction.__pow__

    def guarded(base, exponent):
        if isinstance(exponent, (int, Fraction)) and Fraction(exponent).denominator == 1 and base not in (0, 1, -1):
            e = abs(int(exponent))
            asked.append(e)
            if max(base.numerator.bit_length(), base.denominator.bit_length()) * e > POWER_BITS:
                raise TooMuchWork(f"{base} ** {e} has more than {POWER_BITS} bits")
        return power(base, exponent)

    monkeypatch.setattr(Fraction, "__pow__", guarded)
    return asked


@pytest.mark.parametrize("name", sorted(UNTRUSTED))
def test_untrusted_answers_fail_fast(name, bounded_powers):
    # the bound of the work, not a clock: few Python lines, no big power computed
    with line_budget() as lines:
        reward = countdown_reward(answer(UNTRUSTED[name]), [12, 5, 3], 51)
    assert lines[0] < LINE_BUDGET and all(e < 64 for e in bounded_powers)
    assert reward == 0.1
    assert not Path("/tmp/pwned").exists()
    # and the limit that refuses it is the one meant for it, hit before any of the work it bounds
    if REFUSED_BY[name] is None:
        parse_equation(UNTRUSTED[name])  # well formed: the reward is 0.1 for its numbers
    else:
        with line_budget(), pytest.raises(EquationError, match=re.escape(REFUSED_BY[name])):
            parse_equation(UNTRUSTED[name])


def test_untrusted_whole_responses_fail_fast(bounded_powers):
    # huge responses, many unclosed tags: extraction must stay linear; counted, not timed: the Python
    # lines run do not grow with the response (str.find does the scanning), and stay few
    # (head, repeated part, repeats, tail): the responses "<answer>" * 200_000, "x" * 1_000_000 +
    # "</answer>" and "<answer>1" + "</answer>" * 100_000, each also with twice the repeats
    for head, part, n, tail in [("", "<answer>", 200_000, ""), ("", "x", 1_000_000, "</answer>"),
                                ("<answer>1", "</answer>", 100_000, "")]:
        countdown_reward(head + part * 2 + tail, [12, 5, 3], 51)  # first uses (ABC caches) cost lines once
        counts = []
        for repeats in (n, 2 * n):
            with line_budget() as lines:
                reward = countdown_reward(head + part * repeats + tail, [12, 5, 3], 51)
            counts.append(lines[0])
            assert reward in (0.0, 0.1)
        assert counts[0] == counts[1] < 1_000, counts


def test_deep_nesting_within_limit_parses():
    depth = tasks.MAX_PAREN_DEPTH
    assert parse_equation("(" * depth + "51" + ")" * depth) == (51, [51])
    with pytest.raises(EquationError, match="nested"):
        parse_equation("(" * (depth + 1) + "51" + ")" * (depth + 1))


# ---------------------------------------------------------------------------------------------- solver / generator

def test_solver_known_instances():
    for numbers, target in [([12, 5, 3], 51), ([3, 3, 8, 8], 24), ([1, 5, 5, 5], 24), ([4, 7, 9, 11], 1)]:
        eq = solve_countdown(numbers, target)
        value, used = parse_equation(eq)
        assert value == target and sorted(used) == sorted(numbers)
    assert solve_countdown([1, 1, 1, 1], 97) is None
    assert solve_countdown([2, 3], 7) is None


def test_worked_solution_format():
    text = countdown_worked_solution([12, 5, 3], 51)
    assert text.endswith("</answer>") and "</think> <answer>" in text and not text.startswith("<think>")
    assert "12+5=17" in text
    assert "\n" not in text and countdown_reward(text, [12, 5, 3], 51) == 1.0  # the answer is on the last line
    assert countdown_worked_solution([12, 5, 3], 51, prompt_style="compact").startswith("<think>")
    with pytest.raises(ValueError, match="no solution"):
        countdown_worked_solution([1, 1, 1, 1], 97)


def check_chain(chain: str, numbers: list) -> Fraction:
    """Replays one 'a+b=c, c*d=e' chain by hand: every step's arithmetic is right, each operand is a
    given number or an earlier result, used once, and every number is used. Returns the last value."""
    pool = Counter(Fraction(n) for n in numbers)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
    value = None
    for step in chain.split(", "):
        m = re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+)", step)
        assert m, step
        a, op, b, result = Fraction(m[1]), m[2], Fraction(m[3]), Fraction(m[4])
        assert ops[op](a, b) == result, step
        for operand in (a, b):
            assert pool[operand] > 0, f"{step}: {operand} is not available"
            pool[operand] -= 1
        pool[result] += 1
        value = result
    assert sum(pool.values()) == 1, f"{chain}: not every number used"
    return value


def test_search_solution_tries_and_rejects_before_it_answers():
    """The 'search' worked solution: chains of correct steps that use every number once, each rejected
    chain a near miss (every value at most SEARCH_MAX_VALUE, the last within SEARCH_NEAR of the target
    but not on it, no chain tried twice) marked ' no;', then the one that reaches it marked ' yes',
    then its equation as the answer (which TinyZero's rule scores 1.0). Every count of rejected chains
    from 0 to 4 occurs, so no verdict can be told from its place."""
    task = make_task("countdown", seed=3, num_numbers=3, n_train=300, n_test=8, prompt_style="compact",
                     solution_style="search")
    rng = random.Random(0)
    dead_ends = Counter()
    for example in task.train[:300]:
        numbers, target = example.answer["numbers"], example.answer["target"]
        text = task.worked_solution(example, rng)
        assert text.startswith("<think>") and "\n" not in text
        think, answer = re.fullmatch(r"<think>(.*)</think> <answer>(.*)</answer>", text).groups()
        *tried, accepted = think.split("; ")
        dead_ends[len(tried)] += 1
        assert len(set(tried)) == len(tried)
        for chain in tried:
            assert chain.endswith(" no")
            last = check_chain(chain[:-3], numbers)
            assert last != target and abs(last - target) <= 40, chain
            assert all(int(step.split("=")[1]) <= 200 for step in chain[:-3].split(", ")), chain
        assert accepted.endswith(" yes") and check_chain(accepted[:-4], numbers) == target
        assert countdown_reward(text, numbers, target) == 1.0
        assert parse_equation(answer)[0] == target
    assert set(dead_ends) == {0, 1, 2, 3, 4} and min(dead_ends.values()) >= 10
    first = task.train[0]
    assert countdown_search_solution(first.answer["numbers"], first.answer["target"]) == \
        countdown_search_solution(first.answer["numbers"], first.answer["target"])  # rng=None: deterministic
    with pytest.raises(ValueError, match="solution_style"):
        make_task("countdown", seed=3, n_train=10, n_test=2, solution_style="essay")


@pytest.fixture(scope="module")
def countdown():
    return make_task("countdown", seed=0)


def test_countdown_sizes_and_disjoint(countdown):
    assert (len(countdown.train), len(countdown.test)) == (20_000, 512)
    key = lambda ex: (tuple(sorted(ex.answer["numbers"])), ex.answer["target"])  # noqa: E731
    train_keys, test_keys = {key(e) for e in countdown.train}, {key(e) for e in countdown.test}
    assert len(train_keys) == 20_000 and len(test_keys) == 512 and not train_keys & test_keys
    for ex in countdown.test:
        assert len(ex.answer["numbers"]) == 4 and all(1 <= n <= 99 for n in ex.answer["numbers"])
        assert 1 <= ex.answer["target"] <= 100


def test_countdown_instances_solvable(countdown):
    rng = random.Random(0)
    for ex in countdown.test[:100] + countdown.train[:100]:
        assert solve_countdown(ex.answer["numbers"], ex.answer["target"]) is not None
        for r in (None, rng):
            response = countdown.worked_solution(ex, r)
            assert countdown.reward(response, ex) == 1.0 and countdown.correct(response, ex)


def test_countdown_prompt_tinyzero(countdown):
    ex = countdown.test[0]
    assert ex.prompt.endswith("Assistant: Let me solve this step by step.\n<think>")
    assert "User:" in ex.prompt and "<answer> </answer>" in ex.prompt and str(ex.answer["target"]) in ex.prompt
    assert str(ex.answer["numbers"]) in ex.prompt


def test_countdown_determinism_and_options():
    a = make_task("countdown", seed=3, n_train=50, n_test=20, num_numbers=3, prompt_style="compact")
    b = make_task("countdown", seed=3, n_train=50, n_test=20, num_numbers=3, prompt_style="compact")
    c = make_task("countdown", seed=4, n_train=50, n_test=20, num_numbers=3, prompt_style="compact")
    assert [e.answer for e in a.train + a.test] == [e.answer for e in b.train + b.test]
    assert [e.answer for e in a.train] != [e.answer for e in c.train]
    ex = a.test[0]
    assert ex.prompt == " ".join(map(str, ex.answer["numbers"])) + f" -> {ex.answer['target']}\n"
    assert all(len(e.answer["numbers"]) == 3 for e in a.train)
    assert a.reward(a.worked_solution(ex), ex) == 1.0
    # the test split does not depend on the train size
    d = make_task("countdown", seed=3, n_train=10, n_test=20, num_numbers=3)
    assert [e.answer for e in d.test] == [e.answer for e in a.test]


def test_countdown_bad_arguments():
    with pytest.raises(ValueError, match="num_numbers"):
        make_task("countdown", num_numbers=5)
    with pytest.raises(ValueError, match="prompt_style"):
        make_task("countdown", prompt_style="chat")
    with pytest.raises(ValueError, match="generated"):
        make_task("countdown", data="x.jsonl")
    with pytest.raises(ValueError, match="unknown task"):
        make_task("sudoku")


# ---------------------------------------------------------------------------------------------- gsm8k

@pytest.mark.parametrize("text, value", [
    ("1,000", 1000), ("1000", 1000), ("1000.00", 1000), ("$1,000", 1000), ("\\$1,000.", 1000),
    ("-3", -3), ("0.5", Fraction(1, 2)), (".5", Fraction(1, 2)), ("\\frac{3}{4}", Fraction(3, 4)),
    ("3/4", Fraction(3, 4)), ("25\\%", 25), (" 18 ", 18),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1e5", "١٢", "１２", "1/0", "9" * 100, "1,2", "\\frac{}{2}", "/2"])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


def test_extract_boxed_nested():
    assert extract_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{{a}{b}}") == "{a}{b}"
    assert extract_boxed("\\boxed{unclosed") is None
    assert extract_boxed("nothing") is None


@pytest.mark.parametrize("response, gold, extract, expected", [
    ("so \\boxed{1,000}", "1000", "boxed", 1.0),
    ("so \\boxed{1000.00}", "1,000", "boxed", 1.0),
    ("so \\boxed{\\$1000}.", "1000", "boxed", 1.0),
    ("so \\boxed{999}", "1000", "boxed", 0.0),
    ("\\boxed{1000} wait, \\boxed{12}", "1000", "boxed", 0.0),    # the last box counts
    ("the answer is 1000", "1000", "boxed", 0.0),                  # no box
    ("first 7, then 3 apples and finally 1,000.", "1000", "last_number", 1.0),
    ("it is 1000 or maybe 12", "1000", "last_number", 0.0),
    ("loss of -5", "-5", "last_number", 1.0),
])
def test_gsm8k_reward(response, gold, extract, expected):
    assert gsm8k_reward(response, gold, extract) == expected


def test_gsm8k_untrusted_responses_fail_fast(monkeypatch):
    huge = ["\\boxed{" * 200_000, "1" * 1_000_000, "1," * 500_000, "-" * 1_000_000,
            "\\boxed{" + "{" * 999 + "}" * 1000, "\\boxed{١٢}", "\\boxed{1e999999999}",
            "\\boxed{" + "1" * 1_000_000]  # unclosed: the scan for its brace stops at MAX_BOXED_CHARS
    # the bound of the work, not a clock: the number parser is handed at most the scanned window, the
    # exact value it builds is at most a few thousand digits, and few Python lines run
    handed = []
    number, exact = tasks.parse_number, tasks.Fraction

    def recording_parse_number(text):
        handed.append(len(text))
        return number(text)

    def bounded_fraction(*args):
        if args and isinstance(args[0], str):
            exponent = re.search(r"[eE]([+-]?[0-9]+)", args[0])
            if len(args[0]) > 4_000 or (exponent and abs(int(exponent.group(1))) > 4_000):
                raise TooMuchWork(f"an exact value of {args[0][:20]!r}... ({len(args[0])} characters)")
        return exact(*args)

    monkeypatch.setattr(tasks, "parse_number", recording_parse_number)
    monkeypatch.setattr(tasks, "Fraction", bounded_fraction)
    for response in huge:
        for extract in ("boxed", "last_number"):
            handed.clear()
            with line_budget() as lines:
                assert gsm8k_reward(response, "12", extract) == 0.0
            window = tasks.MAX_BOXED_CHARS if extract == "boxed" else tasks.LAST_NUMBER_WINDOW
            assert max(handed) <= window, (response[:20], extract)
            assert lines[0] < LINE_BUDGET


def test_last_number_window_drops_cut_number():
    # the only number straddles the scan window's start: read nothing rather than its tail
    text = "1" * 20 + "x" * (tasks.LAST_NUMBER_WINDOW - 10)
    assert gsm8k_reward(text, "1" * 10, "last_number") == 0.0
    assert gsm8k_reward("12 " + "x" * 100, "12", "last_number") == 1.0


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GSM_ROWS = [
    {"question": "Tom has 3 apples. He buys 4 more. How many apples does he have?",
     "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A car costs $1,200 and a bike $300. What do both cost?", "answer": "...\n#### 1,500"},
]


def test_gsm8k_from_jsonl(tmp_path):
    task = make_task("gsm8k", data=write_jsonl(tmp_path / "gsm.jsonl", GSM_ROWS))
    assert len(task.train) == len(task.test) == 2
    ex = task.test[0]
    assert ex.answer == "7"
    assert ex.prompt == ("System: Please reason step by step, and put your final answer within \\boxed{}.\n"
                         "Context: Tom has 3 apples. He buys 4 more.\n"
                         "Question: How many apples does he have?\nAnswer:")
    assert task.reward("3 + 4 = 7, so \\boxed{7}", ex) == 1.0 and task.correct("\\boxed{7.0}", ex)
    assert task.reward("\\boxed{1500}", task.test[1]) == 1.0
    last = make_task("gsm8k", data=tmp_path / "gsm.jsonl", extract="last_number")
    assert last.reward("he has 7 apples", last.test[0]) == 1.0


def test_gsm8k_splits_from_dict_and_dir(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GSM_ROWS)
    write_jsonl(tmp_path / "test.jsonl", GSM_ROWS[:1])
    for data in (tmp_path, {"train": tmp_path / "train.jsonl", "test": tmp_path / "test.jsonl"}):
        task = make_task("gsm8k", data=data)
        assert (len(task.train), len(task.test)) == (2, 1)


def test_gsm8k_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        make_task("gsm8k", data=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no examples"):
        make_task("gsm8k", data=write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: not valid JSON"):
        make_task("gsm8k", data=write_jsonl(tmp_path / "bad.jsonl", GSM_ROWS + ['{"question": ']))
    with pytest.raises(ValueError, match=r"line 2: missing field 'answer'"):
        make_task("gsm8k", data=write_jsonl(tmp_path / "noans.jsonl", GSM_ROWS[:1] + [{"question": "q"}]))
    with pytest.raises(ValueError, match=r"line 1: missing field 'question'"):
        make_task("gsm8k", data=write_jsonl(tmp_path / "noq.jsonl", [{"answer": "#### 1"}]))
    with pytest.raises(ValueError, match=r"line 1: field 'answer' must end with '#### <number>'"):
        make_task("gsm8k", data=write_jsonl(tmp_path / "nonum.jsonl", [{"question": "q", "answer": "seven"}]))
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        make_task("gsm8k", data=write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"]))
    with pytest.raises(ValueError, match="extract"):
        make_task("gsm8k", data=tmp_path / "nonum.jsonl", extract="first")


def test_hub_without_datasets_says_pass_a_file(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail, no network
    for name in ("gsm8k", "math"):
        with pytest.raises(ValueError, match="data=<path to a JSONL file>"):
            make_task(name)


# ---------------------------------------------------------------------------------------------- math

def test_math_task_fallback_comparison(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)   # exercise the fallback even if installed
    monkeypatch.setattr(tasks, "_warned_no_math_verify", False)
    rows = [{"problem": "Compute 1/2 + 1/4.", "answer": "\\frac{3}{4}"},
            {"question": "Angle?", "solution": "It is \\boxed{90^\\circ}."},
            {"problem": "Solve for x.", "solution": "So \\boxed{x = 5}", "answer": "5"}]
    task = make_task("math", data=write_jsonl(tmp_path / "math.jsonl", rows))
    a, b, c = task.test
    assert b.answer == "90^\\circ" and c.answer == "5"
    with pytest.warns(UserWarning, match="math-verify is not installed"):
        assert task.reward("\\boxed{\\dfrac{3}{4}}", a) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # warned only once
        assert task.reward("\\boxed{0.75}", a) == 1.0
        assert task.reward("\\boxed{3/5}", a) == 0.0
        assert task.reward("\\boxed{90}", b) == 1.0
        assert task.reward("\\boxed{x=5}", c) == 1.0
        assert task.reward("the answer is 5", c) == 0.0
    with pytest.raises(ValueError, match="boxed"):
        make_task("math", data=tmp_path / "math.jsonl", extract="last_number")
    with pytest.raises(ValueError, match=r"line 1: missing field 'answer' \(or a 'solution'"):
        make_task("math", data=write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "solution": "no box"}]))


def test_math_verify_when_installed():
    pytest.importorskip("math_verify")
    assert tasks.math_reward("\\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert tasks.math_reward("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}") == 1.0
    assert tasks.math_reward("\\boxed{3}", "\\frac{1}{2}") == 0.0


def test_train_refuses_math_500_as_training_set(monkeypatch):
    train = pytest.importorskip("train")
    monkeypatch.setitem(sys.modules, "datasets", None)  # the refusal must not depend on the hub
    with pytest.raises(train.UsageError, match="MATH-500 is an evaluation set") as error:
        train.load_task(train.RunConfig(task="math"))
    assert "--data" in str(error.value) and "\n" not in str(error.value)
