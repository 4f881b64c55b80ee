"""Task suites: the common format, deterministic splits, grading, gold trajectories in the chat format."""

from __future__ import annotations

import collections
import json

import pytest

from forgerl.rollout.scaffold_config import DEFAULT
from forgerl.rollout.suites import swe, tooluse
from forgerl.rollout.tasks import RESULTS_MARKER, Task, get_suite, grade, parse_results, suite_names

pytestmark = pytest.mark.unit


def test_builtin_suites_are_registered() -> None:
    assert suite_names() == ["swe", "tooluse"]
    with pytest.raises(KeyError, match="unknown suite"):
        get_suite("nope")


def test_tooluse_splits_are_deterministic_disjoint_and_balanced() -> None:
    a, b = tooluse.generate(tooluse.SEED), tooluse.generate(tooluse.SEED + 1)
    assert [t.instructions for t in a["train"][:50]] != [t.instructions for t in b["train"][:50]]
    again = tooluse.generate.__wrapped__(tooluse.SEED)  # not the cached object: really regenerated
    assert [t.to_json() for t in again["test"]] == [t.to_json() for t in a["test"]]
    train = {t.instructions for t in a["train"]}
    test = {t.instructions for t in a["test"]}
    assert len(train) == tooluse.SPLIT_SIZES["train"] and len(test) == tooluse.SPLIT_SIZES["test"]
    assert not train & test, "a held-out question also appears in train"
    for split in ("train", "test"):
        levels = collections.Counter(t.difficulty for t in a[split])
        assert set(levels) == {1, 2, 3, 4}
        assert max(levels.values()) - min(levels.values()) <= 1


def test_tooluse_tasks_have_the_common_format() -> None:
    suite = get_suite("tooluse")
    task = suite.tasks("test")[0]
    assert task.id == "tooluse/test/00000" and suite.get(task.id) == task
    assert task.fail_to_pass == ("answer",) and task.pass_to_pass == ()
    assert task.answer_file == "answer.txt" and task.files == {}  # nothing to peek at while working
    assert set(task.test_files) == {".forgerl/check.py"}
    assert json.loads(json.dumps(task.to_json()))["FAIL_TO_PASS"] == ["answer"]


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_tooluse_gold_tool_call_computes_the_answer(level: int) -> None:
    from forgerl.rollout.tools import evaluate_arithmetic, format_number

    for task in [t for t in get_suite("tooluse").tasks("train") if t.difficulty == level][:25]:
        gold = get_suite("tooluse").gold(task)
        (call,) = gold.turns[0]
        if call.name == "calculator":
            assert format_number(evaluate_arithmetic(call.arguments["expression"])) == gold.final_answer
        else:
            code = call.arguments["code"]
            assert code.startswith("print(") and len(code) < 40
            printed: list[str] = []
            exec(code, {"print": printed.append})  # the generated snippets are our own
            assert [str(v) for v in printed] == [gold.final_answer]


def test_gold_trajectories_are_short_openai_messages() -> None:
    item = next(tooluse.gold_trajectories("train"))
    roles = [m["role"] for m in item["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert item["messages"][0]["content"] == DEFAULT.system_prompt("tooluse")
    call = item["messages"][2]["tool_calls"][0]
    assert call["type"] == "function" and json.loads(call["function"]["arguments"])
    assert item["messages"][2]["reasoning_content"]
    assert item["messages"][3]["tool_call_id"] == call["id"]
    assert [t["function"]["name"] for t in item["tools"]] == ["calculator", "python"]
    for m in item["messages"][1:]:
        assert len(m.get("content") or "") + len(m.get("reasoning_content") or "") < 120


def test_render_chatml_matches_the_models_chat_template() -> None:
    """The SFT data rendered by the model's tokenizer equals what the suite's corpus renders: one format."""
    from forgerl.model.tokenizer import train_tokenizer

    texts = list(tooluse.tokenizer_corpus(("test",)))
    assert len(texts) == tooluse.SPLIT_SIZES["test"]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    for item in list(tooluse.gold_trajectories("test"))[:8]:
        rendered = tokenizer.apply_chat_template(item["messages"], tools=item["tools"], tokenize=False)
        assert rendered == tooluse.render_chatml(item["messages"], item["tools"])
    ids = tokenizer.apply_chat_template(item["messages"], tools=item["tools"], tokenize=True)
    assert len(ids) < 1024, "a gold conversation must fit a tiny model's context"


def test_swe_suite_tasks() -> None:
    suite = get_suite("swe")
    train, test = suite.tasks("train"), suite.tasks("test")
    assert len(train) >= 10 and len(test) >= 5
    assert not {t.id for t in train} & {t.id for t in test}
    for task in [*train, *test]:
        assert task.fail_to_pass and task.pass_to_pass
        assert not set(task.fail_to_pass) & set(task.pass_to_pass)
        module = task.metadata["module"]
        assert task.files[f"{module}.py"].count(task.metadata["buggy"]) == 1
        assert task.harness == "unittest" and set(task.test_files) == {"tests/__init__.py", f"tests/test_{module}.py"}
        assert task.test_files[f"tests/test_{module}.py"] == task.files[f"tests/test_{module}.py"]
        gold = suite.gold(task)
        assert gold.turns[0][0].name == "str_replace"
    assert swe.TOOLS == ("bash", "read_file", "write_file", "str_replace")


def _task(f2p: tuple[str, ...], p2p: tuple[str, ...]) -> Task:
    return Task(
        id="s/train/x", suite="s", split="train", instructions="", test_command="", time_budget_s=1, baseline_s=1,
        fail_to_pass=f2p, pass_to_pass=p2p,
    )  # fmt: skip


def test_grade_gates_on_pass_to_pass_and_scores_fail_to_pass() -> None:
    task = _task(("a", "b"), ("c",))
    assert grade(task, {"a": "pass", "b": "pass", "c": "pass"}).success
    half = grade(task, {"a": "pass", "b": "fail", "c": "pass"})
    assert half.performance == 0.5 and not half.success
    broke = grade(task, {"a": "pass", "b": "pass", "c": "fail"})
    assert broke.performance == 0.0 and not broke.success
    missing = grade(task, {"a": "pass", "b": "pass"})
    assert missing.results["c"] == "missing" and missing.performance == 0.0
    crashed = grade(task, None)
    assert crashed.performance == 0.0 and not crashed.success


def test_parse_results_needs_the_nonce() -> None:
    out = f'{RESULTS_MARKER} fake {{"a": "pass"}}\nnoise\n{RESULTS_MARKER} n0nce {{"a": "fail"}}\n'
    assert parse_results(out, "n0nce") == {"a": "fail"}
    assert parse_results(out, "other") is None
    assert parse_results(f"{RESULTS_MARKER} n0nce not-json\n", "n0nce") is None
