"""The software-engineering suite: small Python repositories with one bug and failing unit tests.

Each task is a repository (a module and its `unittest` tests) with one bug injected into a correct
module. The reward is the tests passing, SWE-bench style: FAIL_TO_PASS are the tests the bug breaks,
PASS_TO_PASS every other test of the repository; a task is resolved when all of them pass. The tests and
the harness are the task's in the grading tree (forgerl.rollout.grading), so editing them gains nothing.

Tasks are built deterministically from the templates below (no generated data is shipped); `test` holds
every third bug, `train` the rest. `tests/integration/rollout/test_suites.py` validates every task: the
FAIL_TO_PASS tests fail on the buggy repository and pass after the gold fix, PASS_TO_PASS pass on both.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from forgerl.rollout import harness
from forgerl.rollout.tasks import GoldSolution, Suite, Task, ToolCallSpec

NAME = "swe"
TOOLS = ("bash", "read_file", "write_file", "str_replace")
TIME_BUDGET_S = 600.0
BASELINE_S = 120.0


@dataclass(frozen=True)
class Bug:
    name: str
    correct: str  # a snippet of the correct module
    buggy: str  # what the bug turns it into
    fails: tuple[str, ...]  # test methods ("TestClass.test_name") the bug breaks
    issue: str  # what a user would report


@dataclass(frozen=True)
class Template:
    module: str  # module name, file <module>.py
    source: str
    tests: str  # the unittest file tests/test_<module>.py
    bugs: tuple[Bug, ...]


def _d(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


TEMPLATES: tuple[Template, ...] = (
    Template(
        module="mathutils",
        source=_d('''
            def clamp(x, low, high):
                """x limited to [low, high]."""
                if x < low:
                    return low
                if x > high:
                    return high
                return x


            def mean(values):
                if not values:
                    raise ValueError("mean of nothing")
                return sum(values) / len(values)


            def is_prime(n):
                if n < 2:
                    return False
                i = 2
                while i * i <= n:
                    if n % i == 0:
                        return False
                    i += 1
                return True


            def gcd(a, b):
                while b:
                    a, b = b, a % b
                return abs(a)
            '''),
        tests=_d("""
            import unittest

            from mathutils import clamp, gcd, is_prime, mean


            class TestClamp(unittest.TestCase):
                def test_inside(self):
                    self.assertEqual(clamp(5, 0, 10), 5)

                def test_below(self):
                    self.assertEqual(clamp(-3, 0, 10), 0)

                def test_above(self):
                    self.assertEqual(clamp(42, 0, 10), 10)


            class TestMean(unittest.TestCase):
                def test_values(self):
                    self.assertEqual(mean([1, 2, 3, 4]), 2.5)

                def test_empty(self):
                    with self.assertRaises(ValueError):
                        mean([])


            class TestPrime(unittest.TestCase):
                def test_small(self):
                    self.assertEqual([n for n in range(12) if is_prime(n)], [2, 3, 5, 7, 11])

                def test_squares(self):
                    self.assertFalse(is_prime(49))
                    self.assertFalse(is_prime(121))


            class TestGcd(unittest.TestCase):
                def test_gcd(self):
                    self.assertEqual(gcd(12, 18), 6)

                def test_negative(self):
                    self.assertEqual(gcd(-4, 6), 2)
                    self.assertEqual(gcd(4, -6), 2)
            """),
        bugs=(
            Bug(
                "clamp-upper",
                "    if x > high:\n        return high\n",
                "    if x > high:\n        return x\n",
                ("TestClamp.test_above",),
                "clamp() returns numbers above the upper bound unchanged instead of the bound.",
            ),
            Bug(
                "mean-divisor",
                "return sum(values) / len(values)",
                "return sum(values) / (len(values) + 1)",
                ("TestMean.test_values",),
                "mean([1, 2, 3, 4]) is 2.0, it should be 2.5.",
            ),
            Bug(
                "prime-squares",
                "while i * i <= n:",
                "while i * i < n:",
                ("TestPrime.test_small", "TestPrime.test_squares"),
                "is_prime() says 4, 49 and 121 are prime.",
            ),
            Bug(
                "gcd-abs",
                "return abs(a)",
                "return a",
                ("TestGcd.test_negative",),
                "gcd(4, -6) returns a negative number.",
            ),
        ),
    ),
    Template(
        module="textutils",
        source=_d('''
            def slugify(text):
                """'Hello, World!' -> 'hello-world'."""
                words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
                return "-".join(words)


            def truncate(text, width):
                """At most `width` characters; cut text ends with '...'."""
                if len(text) <= width:
                    return text
                return text[: width - 3] + "..."


            def word_count(text):
                return len(text.split())


            def capitalize_words(text):
                return " ".join(w[:1].upper() + w[1:] for w in text.split(" "))
            '''),
        tests=_d("""
            import unittest

            from textutils import capitalize_words, slugify, truncate, word_count


            class TestSlugify(unittest.TestCase):
                def test_basic(self):
                    self.assertEqual(slugify("Hello, World!"), "hello-world")

                def test_spaces(self):
                    self.assertEqual(slugify("  many   spaces  "), "many-spaces")


            class TestTruncate(unittest.TestCase):
                def test_short(self):
                    self.assertEqual(truncate("abc", 5), "abc")

                def test_exact(self):
                    self.assertEqual(truncate("abcde", 5), "abcde")

                def test_long(self):
                    self.assertEqual(truncate("abcdefgh", 6), "abc...")
                    self.assertEqual(len(truncate("x" * 50, 10)), 10)


            class TestWords(unittest.TestCase):
                def test_count(self):
                    self.assertEqual(word_count("one two  three"), 3)

                def test_capitalize(self):
                    self.assertEqual(capitalize_words("hello big world"), "Hello Big World")
            """),
        bugs=(
            Bug(
                "slug-lower",
                "for c in text.lower()",
                "for c in text",
                ("TestSlugify.test_basic",),
                "slugify('Hello, World!') keeps capital letters.",
            ),
            Bug(
                "truncate-boundary",
                "if len(text) <= width:",
                "if len(text) < width:",
                ("TestTruncate.test_exact",),
                "truncate() cuts a text whose length equals the width.",
            ),
            Bug(
                "truncate-width",
                'return text[: width - 3] + "..."',
                'return text[:width] + "..."',
                ("TestTruncate.test_long",),
                "truncate() returns texts longer than the width.",
            ),
            Bug(
                "word-count-split",
                "return len(text.split())",
                'return len(text.split(" "))',
                ("TestWords.test_count",),
                "word_count() counts double spaces as words.",
            ),
        ),
    ),
    Template(
        module="stack",
        source=_d("""
            class Stack:
                def __init__(self):
                    self._items = []

                def push(self, item):
                    self._items.append(item)

                def pop(self):
                    if not self._items:
                        raise IndexError("pop from an empty stack")
                    return self._items.pop()

                def peek(self):
                    if not self._items:
                        raise IndexError("peek at an empty stack")
                    return self._items[-1]

                def __len__(self):
                    return len(self._items)

                def is_empty(self):
                    return len(self._items) == 0
            """),
        tests=_d("""
            import unittest

            from stack import Stack


            class TestStack(unittest.TestCase):
                def test_lifo(self):
                    s = Stack()
                    for i in range(3):
                        s.push(i)
                    self.assertEqual([s.pop(), s.pop(), s.pop()], [2, 1, 0])

                def test_peek(self):
                    s = Stack()
                    s.push("a")
                    s.push("b")
                    self.assertEqual(s.peek(), "b")
                    self.assertEqual(len(s), 2)

                def test_empty(self):
                    s = Stack()
                    self.assertTrue(s.is_empty())
                    with self.assertRaises(IndexError):
                        s.pop()

                def test_len(self):
                    s = Stack()
                    s.push(1)
                    self.assertEqual(len(s), 1)
                    self.assertFalse(s.is_empty())
            """),
        bugs=(
            Bug(
                "pop-fifo",
                "return self._items.pop()",
                "return self._items.pop(0)",
                ("TestStack.test_lifo",),
                "Stack.pop() returns the oldest item, not the newest.",
            ),
            Bug(
                "peek-first",
                "return self._items[-1]",
                "return self._items[0]",
                ("TestStack.test_peek",),
                "Stack.peek() shows the bottom of the stack.",
            ),
            Bug(
                "empty-check",
                "return len(self._items) == 0",
                "return len(self._items) == 1",
                ("TestStack.test_empty", "TestStack.test_len"),
                "Stack.is_empty() is wrong for empty stacks and stacks of one item.",
            ),
        ),
    ),
    Template(
        module="intervals",
        source=_d('''
            def merge(intervals):
                """Merge overlapping [start, end] intervals; touching intervals merge too."""
                out = []
                for start, end in sorted(intervals):
                    if out and start <= out[-1][1]:
                        out[-1][1] = max(out[-1][1], end)
                    else:
                        out.append([start, end])
                return out


            def overlaps(a, b):
                return a[0] <= b[1] and b[0] <= a[1]


            def total_length(intervals):
                return sum(end - start for start, end in merge(intervals))
            '''),
        tests=_d("""
            import unittest

            from intervals import merge, overlaps, total_length


            class TestMerge(unittest.TestCase):
                def test_disjoint(self):
                    self.assertEqual(merge([[5, 6], [1, 2]]), [[1, 2], [5, 6]])

                def test_overlap(self):
                    self.assertEqual(merge([[1, 4], [2, 3], [3, 8]]), [[1, 8]])
                    self.assertEqual(merge([[1, 10], [2, 3]]), [[1, 10]])

                def test_touching(self):
                    self.assertEqual(merge([[1, 2], [2, 3]]), [[1, 3]])


            class TestOverlaps(unittest.TestCase):
                def test_overlaps(self):
                    self.assertTrue(overlaps([1, 3], [2, 5]))
                    self.assertFalse(overlaps([1, 2], [3, 4]))

                def test_total(self):
                    self.assertEqual(total_length([[0, 2], [1, 4], [10, 11]]), 5)
            """),
        bugs=(
            Bug(
                "merge-touching",
                "if out and start <= out[-1][1]:",
                "if out and start < out[-1][1]:",
                ("TestMerge.test_touching",),
                "merge([[1, 2], [2, 3]]) does not merge touching intervals.",
            ),
            Bug(
                "merge-max",
                "out[-1][1] = max(out[-1][1], end)",
                "out[-1][1] = end",
                ("TestMerge.test_overlap",),
                "merge() shrinks an interval when a shorter one inside it follows.",
            ),
            Bug(
                "merge-sort",
                "for start, end in sorted(intervals):",
                "for start, end in intervals:",
                ("TestMerge.test_disjoint",),
                "merge() returns intervals out of order.",
            ),
        ),
    ),
    Template(
        module="calendar_utils",
        source=_d("""
            def is_leap_year(year):
                return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


            def days_in_month(year, month):
                if month == 2:
                    return 29 if is_leap_year(year) else 28
                if month in (4, 6, 9, 11):
                    return 30
                return 31


            def day_of_year(year, month, day):
                return sum(days_in_month(year, m) for m in range(1, month)) + day
            """),
        tests=_d("""
            import unittest

            from calendar_utils import day_of_year, days_in_month, is_leap_year


            class TestLeap(unittest.TestCase):
                def test_common(self):
                    self.assertTrue(is_leap_year(2024))
                    self.assertFalse(is_leap_year(2023))

                def test_centuries(self):
                    self.assertFalse(is_leap_year(1900))
                    self.assertTrue(is_leap_year(2000))


            class TestMonths(unittest.TestCase):
                def test_lengths(self):
                    self.assertEqual([days_in_month(2023, m) for m in (1, 2, 4, 12)], [31, 28, 30, 31])

                def test_september(self):
                    self.assertEqual(days_in_month(2023, 9), 30)

                def test_day_of_year(self):
                    self.assertEqual(day_of_year(2024, 3, 1), 61)
            """),
        bugs=(
            Bug(
                "leap-400",
                "(year % 100 != 0 or year % 400 == 0)",
                "year % 100 != 0",
                ("TestLeap.test_centuries",),
                "is_leap_year(2000) is False; 2000 was a leap year.",
            ),
            Bug(
                "september",
                "if month in (4, 6, 9, 11):",
                "if month in (4, 6, 11):",
                ("TestMonths.test_september",),
                "days_in_month says September has 31 days.",
            ),
            Bug(
                "day-of-year-range",
                "for m in range(1, month)",
                "for m in range(1, month - 1)",
                ("TestMonths.test_day_of_year",),
                "day_of_year(2024, 3, 1) is 32, it should be 61.",
            ),
        ),
    ),
    Template(
        module="search",
        source=_d('''
            def binary_search(items, target):
                """Index of target in the sorted list, or -1."""
                lo, hi = 0, len(items) - 1
                while lo <= hi:
                    mid = (lo + hi) // 2
                    if items[mid] == target:
                        return mid
                    if items[mid] < target:
                        lo = mid + 1
                    else:
                        hi = mid - 1
                return -1


            def find_first(items, predicate):
                for i, item in enumerate(items):
                    if predicate(item):
                        return i
                return None
            '''),
        tests=_d("""
            import unittest

            from search import binary_search, find_first


            class TestBinarySearch(unittest.TestCase):
                def test_found(self):
                    items = [1, 3, 5, 7, 9, 11]
                    self.assertEqual([binary_search(items, x) for x in items], list(range(6)))

                def test_missing(self):
                    self.assertEqual(binary_search([1, 3, 5], 4), -1)
                    self.assertEqual(binary_search([], 4), -1)


            class TestFindFirst(unittest.TestCase):
                def test_first(self):
                    self.assertEqual(find_first([1, 4, 6, 8], lambda x: x % 2 == 0), 1)

                def test_none(self):
                    self.assertIsNone(find_first([1, 3], lambda x: x > 5))
            """),
        bugs=(
            Bug(
                "bsearch-bounds",
                "while lo <= hi:",
                "while lo < hi:",
                ("TestBinarySearch.test_found",),
                "binary_search misses some items that are in the list.",
            ),
            Bug(
                "find-first-last",
                "            return i\n    return None",
                "            found = i\n    return None",
                ("TestFindFirst.test_first",),
                "find_first never finds anything.",
            ),
        ),
    ),
)


def _test_module(template: Template) -> str:
    return f"tests.test_{template.module}"


def _all_tests(template: Template) -> tuple[str, ...]:
    """Every test id of a template's test file ("tests.test_m.TestClass.test_name"), in file order."""
    ids, current = [], None
    for line in template.tests.splitlines():
        stripped = line.strip()
        if stripped.startswith("class ") and "TestCase" in stripped:
            current = stripped[len("class ") :].split("(")[0]
        elif stripped.startswith("def test") and current:
            ids.append(f"{_test_module(template)}.{current}.{stripped[4:].split('(')[0]}")
    return tuple(ids)


def _task(template: Template, bug: Bug, split: str) -> Task:
    if template.source.count(bug.correct) != 1:
        raise AssertionError(f"{template.module}/{bug.name}: the correct snippet must occur exactly once")
    buggy_source = template.source.replace(bug.correct, bug.buggy)
    if buggy_source.count(bug.buggy) != 1:
        raise AssertionError(f"{template.module}/{bug.name}: the buggy snippet must occur exactly once")
    test_path = f"tests/test_{template.module}.py"
    all_tests = _all_tests(template)
    f2p = tuple(f"{_test_module(template)}.{t}" for t in bug.fails)
    unknown = set(f2p) - set(all_tests)
    if unknown:
        raise AssertionError(f"{template.module}/{bug.name}: no such tests {sorted(unknown)}")
    p2p = tuple(t for t in all_tests if t not in f2p)
    instructions = (
        f"Bug report for the `{template.module}` module: {bug.issue}\n"
        f"The tests in {test_path} show it. Fix {template.module}.py so that all tests pass; "
        f"do not change the tests. Run them with `python3 -m unittest`."
    )
    files = {
        f"{template.module}.py": buggy_source,
        "tests/__init__.py": "",
        test_path: template.tests,
        "README.md": f"# {template.module}\n\nRun the tests: `python3 -m unittest -v`\n",
    }
    return Task(
        id=f"{NAME}/{split}/{template.module}-{bug.name}",
        suite=NAME,
        split=split,
        instructions=instructions,
        test_command=harness.COMMAND,
        time_budget_s=TIME_BUDGET_S,
        baseline_s=BASELINE_S,
        files=files,
        test_files={"tests/__init__.py": "", test_path: template.tests},
        fail_to_pass=f2p,
        pass_to_pass=p2p,
        tools=TOOLS,
        difficulty=len(bug.fails),
        metadata={
            "module": template.module,
            "bug": bug.name,
            "path": f"{template.module}.py",
            "buggy": bug.buggy,
            "correct": bug.correct,
        },
        harness="unittest",
    )


@functools.cache
def generate() -> dict[str, tuple[Task, ...]]:
    splits: dict[str, list[Task]] = {"train": [], "test": []}
    n = 0
    for template in TEMPLATES:
        for bug in template.bugs:
            split = "test" if n % 3 == 2 else "train"
            splits[split].append(_task(template, bug, split))
            n += 1
    return {k: tuple(v) for k, v in splits.items()}


class SweSuite(Suite):
    name = NAME
    splits = ("train", "test")

    def tasks(self, split: str) -> Sequence[Task]:
        if split not in self.splits:
            raise KeyError(f"{NAME}: no split {split!r}")
        return generate()[split]

    def gold(self, task: Task) -> GoldSolution:
        path = task.metadata["path"]
        fix = ToolCallSpec(
            "str_replace",
            {"path": path, "old": task.metadata["buggy"], "new": task.metadata["correct"]},
            reasoning=f"The bug is in {path}; fix it.",
        )
        check = ToolCallSpec("bash", {"command": "python3 -m unittest -q"}, reasoning="Run the tests.")
        return GoldSolution(
            turns=((fix,), (check,)),
            final_answer=f"Fixed the bug in {path}; all tests pass.",
            final_reasoning="The tests pass.",
        )
