"""Service settings from defaults, KWS_* environment variables and `kws serve` flags, and the
one-line errors `kws serve` gives for bad settings."""

import asyncio
import socket
from pathlib import Path

import pytest
from test_app import free_socket, model_path  # noqa: F401

from app.settings import Settings, from_env
from kws.cli import main
from kws.errors import KwsError
from kws.serve import bind


def test_defaults_bind_loopback_with_the_documented_limits():
    settings = from_env({})
    assert (settings.host, settings.port, settings.listen) == ("127.0.0.1", 8000, False)
    assert settings.api_token is None
    assert settings.max_upload_bytes == 10_000_000 and settings.max_duration_s == 60.0


def test_environment_sets_and_flags_override():
    env = {"KWS_MODEL": "/models/a.pt", "KWS_HOST": "0.0.0.0", "KWS_PORT": "9000",
           "KWS_LISTEN": "yes", "KWS_DEVICE": "2", "KWS_API_TOKEN": "abc",
           "KWS_MAX_UPLOAD_BYTES": "5000", "KWS_MAX_DURATION_S": "30", "KWS_WORKERS": "3"}
    settings = from_env(env)
    assert settings.model == Path("/models/a.pt")
    assert (settings.host, settings.port, settings.listen) == ("0.0.0.0", 9000, True)
    assert (settings.device, settings.api_token) == ("2", "abc")
    assert (settings.max_upload_bytes, settings.max_duration_s) == (5000, 30.0)
    assert settings.workers == 3
    flagged = from_env(env, port=8080, model="/other.pt", host=None)
    assert (flagged.port, flagged.model, flagged.host) == (8080, Path("/other.pt"), "0.0.0.0")


def test_threshold_and_words_take_the_text_kws_listen_takes():
    settings = from_env({"KWS_THRESHOLD": "0.8", "KWS_WORDS": "yes, no,stop"})
    assert settings.threshold == 0.8 and settings.words == ("yes", "no", "stop")
    assert from_env({"KWS_THRESHOLD": "yes=0.9,no=0.7"}).threshold == {"yes": 0.9, "no": 0.7}
    assert from_env({"KWS_THRESHOLD": "0.8"}, threshold={"go": 0.5}).threshold == {"go": 0.5}
    assert from_env({"KWS_WORDS": ""}).words is None


@pytest.mark.parametrize("argv,message", [
    (["--threshold", "2"], "threshold 2 is not a probability"),
    (["--words", "yes,banana"], "unknown word(s) 'banana'"),
    (["--threads", "0"], "threads must be a positive integer, got 0"),  # the flag reaches the settings
    (["--listen", "--input", "/nonexistent/demo.wav"], "no audio file at /nonexistent/demo.wav"),
])
def test_serve_with_bad_detector_settings_is_a_one_line_error(argv, message, model_path,  # noqa: F811
                                                              capsys):
    assert main(["serve", "--model", str(model_path), "--port", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_serve_threshold_text_is_checked_as_kws_listen_checks_it(capsys):
    for command in ("serve", "listen"):
        with pytest.raises(SystemExit) as exit:
            main([command, "--threshold", "high"])
        assert exit.value.code == 2
        assert "argument --threshold: 'high': give a probability like 0.8" in capsys.readouterr().err


def test_empty_token_means_no_token():
    assert from_env({"KWS_API_TOKEN": ""}).api_token is None


@pytest.mark.parametrize("variable,name", [
    ("KWS_DEVICE", "device"), ("KWS_LISTEN_INPUT", "listen_input"), ("KWS_API_TOKEN", "api_token"),
])
def test_set_but_empty_variables_count_as_unset(variable, name, monkeypatch):
    """docker compose passes KWS_DEVICE through from the host, empty when the host has none:
    an empty value for a setting that defaults to None is None, not ""."""
    monkeypatch.setenv(variable, "")
    assert getattr(from_env(), name) is None
    assert getattr(from_env({variable: ""}), name) is None
    assert getattr(from_env({variable: "2"}), name) == "2"  # a value still counts


@pytest.mark.parametrize("env,words", [
    ({"KWS_PORT": "eighty"}, "KWS_PORT='eighty'"),
    ({"KWS_LISTEN": "maybe"}, "KWS_LISTEN='maybe'"),
    ({"KWS_WORKERS": "0"}, "workers must be a positive integer"),
    ({"KWS_MAX_DURATION_S": "0.05"}, "max_duration_s must be longer than the shortest clip /predict takes"),
    ({"KWS_PORT": "70000"}, "port must be at most 65535"),
    ({"KWS_THRESHOLD": "yes=high"}, "KWS_THRESHOLD: 'yes=high': give a probability"),
    ({"KWS_WORDS": ","}, "KWS_WORDS: ',': give words"),
])
def test_bad_environment_values_are_named(env, words):
    with pytest.raises(KwsError, match=words.replace("(", r"\(")):
        from_env(env)


def test_serve_with_a_missing_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kws: error: no model file at") and err.count("\n") == 1


def test_serve_on_a_taken_port_is_a_one_line_error(model_path, capsys):  # noqa: F811
    taken = free_socket()
    try:
        assert main(["serve", "--model", str(model_path), "--port", str(taken.getsockname()[1])]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert err.startswith("kws: error: cannot listen on 127.0.0.1:") and "in use" in err


def test_served_connections_send_without_nagle_delay():
    """Accepted connections have TCP_NODELAY, so a response's headers and body (two writes) do
    not wait ~40 ms for the client's delayed ACK."""
    async def accept_one() -> int:
        answer = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            sock = writer.get_extra_info("socket")
            answer.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        listening = bind("127.0.0.1", 0)
        server = await asyncio.start_server(handle, sock=listening)
        async with server:
            _, writer = await asyncio.open_connection(*listening.getsockname())
            nodelay = await asyncio.wait_for(answer, 10)
            writer.close()
        return nodelay

    assert asyncio.run(accept_one()) != 0


def test_serve_input_file_needs_listen(model_path, capsys):  # noqa: F811
    assert main(["serve", "--model", str(model_path), "--input", "x.wav"]) == 2
    assert "add --listen" in capsys.readouterr().err


def test_serve_on_a_port_beyond_65535_is_a_one_line_error(model_path, capsys):  # noqa: F811
    assert main(["serve", "--model", str(model_path), "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "port must be at most 65535" in err and err.count("\n") == 1


def test_settings_reject_a_zero_port():
    with pytest.raises(KwsError, match="port must be a positive integer"):
        Settings(port=0)
