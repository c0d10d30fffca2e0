"""The settings file (SPEC section 5): required keys, defaults, and errors that name the key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

import student_sync
from conftest import ROOT
from testkit import district


def load(changes: dict | None = None, remove: tuple = ()) -> student_sync.Settings:
    raw = copy.deepcopy(district.BASE_SETTINGS)
    for section, keys in (changes or {}).items():
        raw.setdefault(section, {}).update(keys)
    for section, key in remove:
        raw[section].pop(key)
    return student_sync.settings_from_dict(raw, ROOT / "student_sync.toml")


def test_the_example_settings_file_loads_with_its_district_values():
    settings = student_sync.load_settings(ROOT / "student_sync.example.toml")
    assert settings.google.email_suffix == "@d118.org"
    assert settings.ous.grades[12] == "/12th" and settings.ous.grades[13] == ""
    assert settings.safety.max_suspensions == 100


def test_domain_defaults_to_the_domain_of_the_email_suffix():
    assert load(remove=[("google", "domain")]).google.domain == "d118.org"


def test_keys_left_out_take_the_spec_defaults():
    raw = {"google": {"email_suffix": "@d118.org", "auth": "none", "api_endpoint": "http://127.0.0.1:9/"},
           "ous": {"student_prefix": "/S/", "suspended": "/X", "graduated": "/X/G", "grades": {"9": "/9th"}},
           "custom_schema": {"category": "C", "school_field": "a", "grad_year_field": "b"}}
    settings = student_sync.settings_from_dict(raw, ROOT / "student_sync.toml")
    assert settings.powerschool.connect_timeout == 30
    assert settings.google.max_requests_per_second == 35 and settings.google.max_creates_per_second == 9
    assert settings.accounts.no_grade_ou_schools == {999999, 901}
    assert settings.accounts.bad_names == {"test", "tester", "teststudent", "training1", "registration"}
    assert settings.ous.frozen == ("/Restricted", "/Adobe Licensed Students")
    assert settings.safety.max_suspensions == 100 and settings.safety.max_school_drop_percent == 30
    assert settings.logging.keep == 60 and settings.email is None


@pytest.mark.parametrize("changes, remove, named", [
    ({}, [("google", "email_suffix")], "[google] email_suffix"),
    ({}, [("ous", "grades")], "[ous] grades"),
    ({}, [("custom_schema", "category")], "[custom_schema] category"),
    ({"google": {"auth": "none"}}, [("google", "api_endpoint")], "[google] api_endpoint"),
    ({"google": {"auth": "service_account"}}, [], "[google] service_account_file"),
    ({"google": {"auth": "kerberos"}}, [], "[google] auth"),
    ({"safety": {"max_suspensions": "many"}}, [], "[safety] max_suspensions"),
    ({"accounts": {"bad_names": "test"}}, [], "[accounts] bad_names"),
    ({"ous": {"suspended": "Suspended"}}, [], "[ous] suspended"),
    ({"ous": {"student_prefix": "/D118 Students"}}, [], "[ous] student_prefix"),
    ({"email": {"smtp_host": "mail", "from": "a@b.c", "to": ["t@b.c"], "when": "sometimes"}}, [],
     "[email] when"),
    ({"logging": {"folder": "logs"}}, [], "[logging] folder"),
    ({"reporting": {"x": 1}}, [], "[reporting]"),
], ids=lambda value: str(value)[:40])
def test_a_wrong_or_missing_key_is_an_error_that_names_it(changes, remove, named):
    with pytest.raises(student_sync.SettingsError) as raised:
        load(changes, tuple(remove))
    assert named in str(raised.value)
    assert raised.value.exit_code == 2


def test_a_missing_settings_file_says_what_to_do(tmp_path):
    with pytest.raises(student_sync.SettingsError, match="student_sync.example.toml"):
        student_sync.load_settings(tmp_path / "student_sync.toml")


def test_relative_paths_are_beside_the_settings_file():
    settings = load({"powerschool": {"sqlite": "copy.sqlite3"}})
    assert settings.powerschool.sqlite == Path(ROOT / "copy.sqlite3")


def test_licenses_keys_default_to_the_values_the_spec_shows():
    """SPEC 5: a key not listed as required defaults to the value shown; SPEC 8 shows
    product_id = "101031" and sku_id = "1010310008" (Education Plus, Student)."""
    settings = load({"licenses": {"assign": True}})
    assert (settings.licenses.product_id, settings.licenses.sku_id) == ("101031", "1010310008")


def test_uncommenting_the_example_sqlite_line_reads_that_sqlite_copy():
    """The example file leaves `source` to its default, so that the `# sqlite = ...` line it
    shows, once uncommented, is what the run reads (SPEC 9: sqlite = "path" implies it)."""
    text = (ROOT / "student_sync.example.toml").read_text(encoding="utf-8")
    assert "\n# sqlite = " in text
    raw = student_sync.tomllib.loads(text.replace("\n# sqlite = ", "\nsqlite = ", 1))
    settings = student_sync.settings_from_dict(raw, ROOT / "student_sync.toml")
    assert settings.powerschool.source == "sqlite" and settings.powerschool.sqlite is not None


@pytest.mark.parametrize("source, key, value", [
    ("oracle", "sqlite", "copy.sqlite3"),
    ("api", "sqlite", "copy.sqlite3"),
    ("oracle", "url", "https://ps.d118.org"),
    ("sqlite", "url", "https://ps.d118.org"),
])
def test_a_source_key_that_the_chosen_source_does_not_use_is_an_error_naming_both(source, key, value):
    """A sqlite path under source = "oracle" was silently ignored (and the run read Oracle):
    contradictory keys are a settings error naming both, never a silent choice."""
    changes = {"source": source, key: value}
    if source == "api":
        changes["url"] = "https://ps.d118.org"
    remove = () if key == "sqlite" or source == "sqlite" else (("powerschool", "sqlite"),)
    with pytest.raises(student_sync.SettingsError) as raised:
        load({"powerschool": changes}, remove)
    assert "[powerschool] source" in str(raised.value) and f"[powerschool] {key}" in str(raised.value)
    assert raised.value.exit_code == 2


@pytest.mark.parametrize("section, key", [
    ("powerschool", "user_env"), ("powerschool", "password_env"), ("powerschool", "dsn_env"),
    ("powerschool", "client_id_env"), ("accounts", "new_password_env"),
    ("email", "user_env"), ("email", "password_env"),
])
def test_an_empty_variable_name_is_a_settings_error_naming_the_key(section, key):
    """Every *_env key names an environment variable: an empty name would make a run say
    "(the new-account password) is not set ... --store-secret " with no name in it."""
    changes = {section: {key: "  "}}
    if section == "email":
        changes["email"].update({"smtp_host": "mail", "from": "a@d118.org", "to": ["t@d118.org"]})
    with pytest.raises(student_sync.SettingsError, match=rf"\[{section}\] {key}"):
        load(changes)
