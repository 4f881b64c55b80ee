"""Configuration precedence and error messages of forgerl.runtime.config."""

from pathlib import Path

import pytest

from forgerl.runtime.config import ConfigError, ServiceConfig, env_key, load_config

pytestmark = pytest.mark.unit


class ToyConfig(ServiceConfig):
    batch_size: int = 8
    topic_prefix: str = "forgerl"


def test_defaults_apply_without_flags_or_environment() -> None:
    config = load_config(ToyConfig, "toy", [], environ={})
    assert (config.host, config.port, config.batch_size, config.auth_token) == ("127.0.0.1", 50051, 8, None)


def test_flags_beat_service_environment_which_beats_shared_environment() -> None:
    environ = {"FORGERL_TOY_PORT": "6000", "FORGERL_TOY_BATCH_SIZE": "4", "FORGERL_AUTH_TOKEN": "shared"}
    config = load_config(ToyConfig, "toy", ["--batch-size", "16"], environ=environ)
    assert (config.port, config.batch_size, config.auth_token) == (6000, 16, "shared")
    config = load_config(ToyConfig, "toy", [], environ={**environ, "FORGERL_TOY_AUTH_TOKEN": "own"})
    assert config.auth_token == "own"


def test_shared_variables_only_cover_shared_keys() -> None:
    config = load_config(ToyConfig, "toy", [], environ={"FORGERL_PORT": "7000", "FORGERL_STATE_DIR": "/tmp/x"})
    assert config.port == 50051
    assert config.state_dir == Path("/tmp/x")


def test_equals_form_of_flags() -> None:
    assert load_config(ToyConfig, "toy", ["--topic-prefix=run7"], environ={}).topic_prefix == "run7"


def test_bad_value_names_the_flag_and_the_variable() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ToyConfig, "toy", [], environ={"FORGERL_TOY_BATCH_SIZE": "many"})
    assert "--batch-size" in str(err.value)
    assert "FORGERL_TOY_BATCH_SIZE" in str(err.value)


def test_unknown_flag_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown flag --bach-size.*--batch-size"):
        load_config(ToyConfig, "toy", ["--bach-size", "3"], environ={})


def test_flag_without_value_and_stray_argument_are_refused() -> None:
    with pytest.raises(ConfigError, match="needs a value"):
        load_config(ToyConfig, "toy", ["--port"], environ={})
    with pytest.raises(ConfigError, match="unexpected argument"):
        load_config(ToyConfig, "toy", ["port"], environ={})


def test_out_of_range_port_is_refused() -> None:
    with pytest.raises(ConfigError, match="port"):
        load_config(ToyConfig, "toy", ["--port", "70000"], environ={})


def test_env_key_spelling() -> None:
    assert env_key("datapool", "kafka_bootstrap") == "FORGERL_DATAPOOL_KAFKA_BOOTSTRAP"


def test_metrics_auth_without_a_token_is_refused_with_what_to_do() -> None:
    with pytest.raises(ConfigError, match="metrics_auth is on but auth_token is unset: set FORGERL_AUTH_TOKEN"):
        load_config(ToyConfig, "toy", [], environ={"FORGERL_METRICS_AUTH": "true"})
    config = load_config(ToyConfig, "toy", [], environ={"FORGERL_METRICS_AUTH": "1", "FORGERL_AUTH_TOKEN": "t"})
    assert config.metrics_auth and config.auth_token == "t"
