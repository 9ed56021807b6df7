"""The seed's class as its users call it: names, argument orders, return shapes, exceptions; the
snake_case aliases; and no secret in any return value, error text or log record."""

from __future__ import annotations

import json
import logging

import pytest

import api_jongler
from api_jongler import APIJongler, NoKeyAvailableError
from conftest import GEMINI

ENDPOINT = "/v1beta/models/gemini-1.5-flash:generateContent"
BODY = {"contents": [{"parts": [{"text": "Hello"}]}]}


def test_request_returns_text_and_status(sandbox):
    text, status = APIJongler(GEMINI).request("POST", ENDPOINT, json.dumps(BODY))
    assert status == 200
    assert json.loads(text)["candidates"][0]["content"]["parts"][0]["text"]


def test_request_json_takes_both_argument_orders(sandbox):
    jongler = APIJongler(GEMINI)
    positional = jongler.requestJSON(ENDPOINT, BODY)  # the README's order: the dict second
    seed_order = jongler.requestJSON(ENDPOINT, "POST", BODY)  # the seed's signature
    keywords = jongler.requestJSON(endpoint=ENDPOINT, data=BODY)
    for answer in (positional, seed_order, keywords):
        assert "candidates" in answer
    with pytest.raises(TypeError):
        jongler.requestJSON(ENDPOINT, BODY, BODY)


def test_request_json_returns_error_bodies_as_data(sandbox):
    # As the seed: an error answer comes back as its parsed dict (a 404 here, for a GET).
    answer = APIJongler(GEMINI).requestJSON(ENDPOINT, "GET")
    assert isinstance(answer, dict)


def test_key_states_are_sets_of_names(sandbox):
    jongler = APIJongler(GEMINI)
    states = jongler.getKeyStates()
    assert set(states) == {"vacant", "locked", "lockdown", "error"}
    assert states["vacant"] == {"key0", "key1", "key2", "key3"}
    assert all(isinstance(names, set) for names in states.values())
    assert jongler.getVacantKeys() == states["vacant"]
    assert jongler.getLockdownKeys() == set() == jongler.getLockedKeys() == jongler.getErrorKeys()


def test_available_keys_are_names_and_fingerprints_never_secrets(sandbox):
    available = APIJongler(GEMINI).getAvailableKeys()
    assert set(available) == {"key0", "key1", "key2", "key3"}
    for name, fingerprint in available.items():
        assert fingerprint and fingerprint not in sandbox.all_secrets()
        assert sandbox.secrets[GEMINI][name] not in fingerprint


def test_every_key_held_is_a_runtime_error_with_the_seeds_words(one_key_sandbox):
    holder = APIJongler(GEMINI, per_connection=True)
    assert holder.getLockedKeys() == {"key0"}
    with pytest.raises(RuntimeError, match="No API keys available") as raised:
        APIJongler(GEMINI).requestJSON(ENDPOINT, BODY)
    assert isinstance(raised.value, NoKeyAvailableError)
    holder.disconnect()
    assert APIJongler(GEMINI).getVacantKeys() == {"key0"}


def test_configuration_errors_are_the_seeds_types(sandbox, monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-connector"):
        APIJongler("no-such-connector")
    monkeypatch.setenv("APIJONGLER_CONFIG", str(tmp_path / "missing.ini"))
    with pytest.raises(FileNotFoundError, match="missing.ini"):
        APIJongler(GEMINI)
    monkeypatch.delenv("APIJONGLER_CONFIG")
    with pytest.raises(ValueError, match="APIJONGLER_CONFIG"):
        APIJongler(GEMINI)


def test_cleanup_is_static_and_spares_live_holders(one_key_sandbox):
    holder = APIJongler(GEMINI, per_connection=True)
    assert APIJongler.cleanUp() == 0
    assert APIJongler.cleanUp(GEMINI) == 0
    assert holder.getLockedKeys() == {"key0"}


def test_snake_case_aliases(sandbox):
    jongler = APIJongler(GEMINI)
    assert jongler.request_json(ENDPOINT, BODY) == jongler.requestJSON(ENDPOINT, BODY)
    assert jongler.get_key_states() == jongler.getKeyStates()
    assert jongler.get_vacant_keys() == jongler.getVacantKeys()
    assert jongler.get_available_keys() == jongler.getAvailableKeys()
    assert APIJongler.clean_up(GEMINI) == APIJongler.cleanup(GEMINI) == 0
    with APIJongler(GEMINI, per_connection=True) as held:
        assert held.get_locked_keys() == {"key0"} or len(held.get_locked_keys()) == 1
    assert len(jongler.get_vacant_keys()) == 4


def test_the_package_is_typed():
    from importlib import resources

    files = resources.files(api_jongler)
    assert files.joinpath("py.typed").is_file()
    assert files.joinpath("_native.pyi").is_file()


def test_no_secret_in_return_values_errors_or_log_records(sandbox, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    jongler = APIJongler(GEMINI)
    seen = [
        jongler.request("POST", ENDPOINT, json.dumps(BODY)),
        jongler.requestJSON(ENDPOINT, BODY),
        jongler.getKeyStates(),
        jongler.getAvailableKeys(),
        repr(jongler),
    ]
    # A connector whose upstream does not answer: the error text names the request, never the key.
    dead = tmp_path / "dead"
    dead.mkdir()
    (dead / f"{GEMINI}.json").write_text(json.dumps({"name": GEMINI, "host": "127.0.0.1", "port": 9, "protocol": "http"}))
    with pytest.raises(RuntimeError, match="Request failed") as failed:
        APIJongler(GEMINI, connectors_dir=dead, timeout=5).request("POST", ENDPOINT, "{}")
    seen.append(str(failed.value))
    records = [record for record in caplog.records if record.name.startswith("api_jongler")]
    assert any("key claimed" in record.getMessage() for record in records), "the library's log reached logging"
    text = repr(seen) + "\n".join(record.getMessage() for record in caplog.records)
    for secret in sandbox.all_secrets():
        assert secret not in text
