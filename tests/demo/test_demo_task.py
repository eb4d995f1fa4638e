"""``demo.task``: seeded splits, held-out items never trained on, and answers that ``demo/record_schema.json``
(the structured-output docs' schema) accepts."""

from __future__ import annotations

import json

import jsonschema
import pytest

from demo import task


@pytest.mark.parametrize("long", [False, True])
def test_splits_are_seeded_and_held_out(long):
    valid, test = task.split("valid", 50, long), task.split("test", 50, long)
    assert valid == task.split("valid", 50, long) and test[:10] == task.split("test", 10, long)
    prompts = {item.prompt for item in valid} | {item.prompt for item in test}
    assert len(prompts) == 100  # the two held-out splits share no prompt
    assert not any(task._in_train(prompt, long) for prompt in prompts)


@pytest.mark.parametrize("long", [False, True])
def test_answers_follow_the_record_schema(long):
    record = json.loads(task.RECORD_SCHEMA.read_text())
    people = set()
    for item in task.split("test", 40, long):
        answer = json.loads(item.answer)
        records = answer if isinstance(answer, list) else [answer]
        for value in records:
            jsonschema.validate(value, record)
            assert value["name"] in item.prompt and str(value["age"]) in item.prompt
        people.add(len(records))
    assert people == ({1, 2, 3, 4} if long else {1})


def test_a_model_canvas_picks_its_task():
    assert task.is_long(task.LONG_CANVAS_LENGTH) and not task.is_long(task.CANVAS_LENGTH)
    assert task.max_tokens(task.CANVAS_LENGTH) == task.MAX_TOKENS
    assert task.max_tokens(task.LONG_CANVAS_LENGTH) == 2 * task.LONG_CANVAS_LENGTH
