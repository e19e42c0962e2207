from pathlib import Path

import pytest

from ppl_model.categories import Backend, Precision
from worker.settings import Settings, SettingsError, env_names, provenance_policy

REPO = Path(__file__).resolve().parents[2]


def test_defaults_follow_the_design_contract():
    settings = Settings.from_env({})
    assert settings.broker_url == "redis://localhost:6379/0"
    assert settings.database_url == "postgresql+psycopg://localhost/ppl"
    assert settings.model_dir is None


def test_environment_values_are_parsed_into_their_types(tmp_path):
    settings = Settings.from_env({
        "PPL_BATCH_SIZE": "48", "PPL_FETCH_READ_TIMEOUT_S": "2.5", "PPL_MODEL_DIR": str(tmp_path),
        "PPL_FILE_ROOTS": f"{tmp_path}/a:{tmp_path}/b", "PPL_URL_ALLOWLIST": "10.0.0.0/8, images.internal",
        "PPL_DEVICE": "", "UNRELATED": "x",
    })
    assert settings.batch_size == 48 and settings.prefetch_count == (settings.batches_in_flight + 1) * 48
    assert settings.fetch_read_timeout_s == 2.5
    assert settings.model_dir == tmp_path
    assert settings.file_roots == (tmp_path / "a", tmp_path / "b")
    assert settings.url_allowlist == ("10.0.0.0/8", "images.internal")
    assert settings.device is None


def test_ipv6_allowlist_entries_keep_their_colons():
    settings = Settings.from_env({"PPL_URL_ALLOWLIST": "fd00::/8,::1, 10.0.0.0/8"})
    assert settings.url_allowlist == ("fd00::/8", "::1", "10.0.0.0/8")


def test_keyword_overrides_win_over_the_environment():
    assert Settings.from_env({"PPL_BATCH_SIZE": "8"}, batch_size=4).batch_size == 4


def test_backend_and_precision_become_enum_members_from_the_same_strings():
    settings = Settings.from_env({"PPL_BACKEND": "onnxruntime"}, precision="bf16")
    assert settings.backend is Backend.ONNXRUNTIME and settings.precision is Precision.BF16
    assert settings.backend == "onnxruntime" and settings.redacted()["precision"] == "bf16"
    assert Settings.from_env({}).backend is Backend.AUTO


@pytest.mark.parametrize(("name", "value", "message"), [
    ("PPL_BATCH_SIZE", "many", "PPL_BATCH_SIZE='many' is not a valid int"),
    ("PPL_BATCH_SIZE", "0", "PPL_BATCH_SIZE must be positive"),
    ("PPL_BACKEND", "tpu", "PPL_BACKEND must be"),
    ("PPL_PRECISION", "fp8", "PPL_PRECISION must be fp32, bf16 or fp16, got 'fp8'"),
])
def test_bad_values_name_the_variable(name, value, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({name: value})


def test_passwords_are_hidden_when_settings_are_shown():
    shown = Settings.from_env({"PPL_DATABASE_URL": "postgresql+psycopg://ppl:s3cret@db/ppl"}).redacted()
    assert shown["database_url"] == "postgresql+psycopg://ppl:***@db/ppl"
    assert "s3cret" not in str(shown)


def test_every_setting_is_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    missing = [name for name in env_names() if f"`{name}`" not in readme]
    assert not missing, f"README does not document {missing}"


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("true", True), ("YES", True), (" yes ", True),
                                               ("0", False), ("false", False), ("No", False)])
def test_booleans_take_the_usual_spellings(raw, expected):
    assert Settings.from_env({"PPL_TRUST_UNSIGNED_METADATA": raw}).trust_unsigned_metadata is expected
    assert Settings.from_env({}).trust_unsigned_metadata is False  # off unless the operator turns it on


@pytest.mark.parametrize("raw", ["", "on", "2", "tru", "enabled"])
def test_a_boolean_setting_refuses_anything_else(raw):
    with pytest.raises(SettingsError, match="PPL_TRUST_UNSIGNED_METADATA=.* is not a boolean"):
        Settings.from_env({"PPL_TRUST_UNSIGNED_METADATA": raw})
    with pytest.raises(SettingsError, match="PPL_TRUST_UNSIGNED_METADATA must be a boolean"):
        Settings.from_env({}, trust_unsigned_metadata=raw)


def test_the_provenance_policy_reads_the_trust_anchors_once(tmp_path):
    from tests.provenance_files import signing_chain

    anchors = tmp_path / "anchors.pem"
    anchors.write_text(signing_chain().root_pem)
    settings = Settings.from_env({"PPL_C2PA_TRUST_ANCHORS": str(anchors), "PPL_TRUST_UNSIGNED_METADATA": "yes"})
    policy = provenance_policy(settings)
    assert policy.trust_anchors_pem == signing_chain().root_pem and policy.trust_unsigned_metadata
    anchors.unlink()  # built once per process: the policy does not read the file again
    assert provenance_policy(settings) is policy
    assert provenance_policy(Settings.from_env({})).trust_anchors_pem == ""  # none by default


@pytest.mark.parametrize(("content", "message"), [
    (None, "No such file"),
    ("not a certificate\n", "no PEM certificate"),
    ("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n", "C2PA trust anchors"),
])
def test_bad_trust_anchors_are_a_settings_error_naming_the_variable(tmp_path, content, message):
    anchors = tmp_path / f"bad-{len(content or '')}.pem"
    if content is not None:
        anchors.write_text(content)
    with pytest.raises(SettingsError, match=f"PPL_C2PA_TRUST_ANCHORS: .*{message}"):
        provenance_policy(Settings.from_env({"PPL_C2PA_TRUST_ANCHORS": str(anchors)}))
