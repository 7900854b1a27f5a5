"""error_line: the one-line description every error message of the project embeds."""

from __future__ import annotations

import pytest
import yaml
from ray.exceptions import ActorDiedError, RayTaskError

from vla_dist.config import load_config
from vla_dist.errors import ConfigError, error_line


def test_a_plain_error_gives_its_first_line_or_its_type() -> None:
    try:
        yaml.safe_load("a: [1, 2")
    except yaml.YAMLError as error:
        assert error_line(error) == str(error).strip().splitlines()[0]
    assert error_line(ValueError("\n  bad value  \nmore detail")) == "bad value"
    assert error_line(KeyError()) == "KeyError"
    assert error_line(ValueError("x" * 1000), limit=50) == "x" * 50


def test_an_error_raised_in_a_ray_task_is_named_by_its_cause() -> None:
    try:
        raise RuntimeError("disk full\nwhile saving step 4")
    except RuntimeError as cause:
        wrapped = RayTaskError("SFTWorker.save", "Traceback (most recent call last):\n  ...", cause)
    assert "disk full" not in str(wrapped).splitlines()[0]  # what a first line alone would say
    assert error_line(wrapped) == "RuntimeError: disk full"


def test_an_actor_death_says_why() -> None:
    died = ActorDiedError()
    assert error_line(died) == f"ActorDiedError: {str(died).strip().splitlines()[-1]}"


def test_config_messages_keep_omegaconfs_first_line() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(None, ["collect.episodes=abc"])
    assert raised.value.key == "collect.episodes" and "\n" not in raised.value.problem
    assert "abc" in raised.value.problem
