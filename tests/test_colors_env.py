"""The colour environment: deterministic prompts, disjoint splits, tolerant rewards."""

from __future__ import annotations

import numpy as np
import pytest

from environments import available, make_env
from environments.colors import PALETTE, QUESTION, first_word


def test_registry_builds_colors_with_args() -> None:
    assert "colors" in available()
    env = make_env("colors", {"num_colors": 3, "image_size": 32})
    ex = env.train_examples(step=0, n=4)
    assert len(ex) == 4
    assert all(e.answer in ("red", "green", "blue") for e in ex)
    assert ex[0].images[0].size == (32, 32)


def test_unknown_env_and_bad_args() -> None:
    with pytest.raises(KeyError):
        make_env("nope")
    with pytest.raises(ValueError, match="num_colors"):
        make_env("colors", {"num_colors": 99})
    with pytest.raises(TypeError):
        make_env("colors", {"colours": 3})


def test_prompts_are_deterministic_and_have_an_image_and_the_question() -> None:
    a = make_env("colors", {"seed": 7}).train_examples(3, 5)
    b = make_env("colors", {"seed": 7}).train_examples(3, 5)
    for x, y in zip(a, b):
        assert x.answer == y.answer
        assert np.array_equal(np.asarray(x.images[0]), np.asarray(y.images[0]))
    content = a[0].messages[-1]["content"]
    assert content[0]["type"] == "image" and content[1] == {"type": "text", "text": QUESTION}
    c = make_env("colors", {"seed": 8}).train_examples(3, 5)
    assert [x.answer for x in a] != [x.answer for x in c] or not all(
        np.array_equal(np.asarray(x.images[0]), np.asarray(y.images[0])) for x, y in zip(a, c)
    )


def test_train_and_eval_splits_differ() -> None:
    env = make_env("colors", {})
    train = {np.asarray(e.images[0]).tobytes() for s in range(5) for e in env.train_examples(s, 20)}
    evals = {np.asarray(e.images[0]).tobytes() for e in env.eval_examples(50)}
    assert not train & evals


def test_images_are_near_their_colour_and_all_colours_appear() -> None:
    env = make_env("colors", {"num_colors": 5, "noise_fraction": 0.0})
    seen = set()
    for e in env.eval_examples(100):
        mean = np.asarray(e.images[0], dtype=np.float32).reshape(-1, 3).mean(0)
        nearest = min(env.colors, key=lambda c: float(np.sum((np.array(PALETTE[c]) - mean) ** 2)))
        assert nearest == e.answer
        seen.add(e.answer)
    assert seen == set(env.colors)


@pytest.mark.parametrize(
    "completion,reward",
    [("red", 1.0), ("Red.", 1.0), ("  RED!<|im_end|>", 1.0), ("red, I think", 1.0), ("blue", 0.0), ("", 0.0),
     ("it is red", 0.0)],
)
def test_reward_tolerates_case_and_punctuation(completion: str, reward: float) -> None:
    env = make_env("colors", {})
    ex = env.train_examples(0, 1)[0]
    ex.answer = "red"
    score = env.score(ex, completion)
    assert score.reward == reward
    assert score.parts["correct"] == reward


def test_first_word() -> None:
    assert first_word("...Green!") == "green"
    assert first_word("123") == ""
