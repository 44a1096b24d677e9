from pathlib import Path

import pytest

from dicomnode.config import ConfigError, load_config

from nodeutil import REPO, write_config


def test_repo_config_resolves_paths_against_its_folder():
    config = load_config(REPO / "config.toml")
    assert config.node.ae_title == "DICOMNODE"
    assert config.node.study_quiet_seconds == 60
    assert config.node.data_dir == REPO / "var"
    assert config.models[0].path == REPO / "models" / "demo-petct"
    assert config.models[0].use_mirroring is False
    assert config.database_url == f"sqlite:///{REPO / 'var' / 'dicomnode.db'}"
    assert [d.name for d in config.destinations_for(config.models[0])] == ["pacs"]


def test_unknown_key_is_named(tmp_path: Path):
    path = write_config(tmp_path, node="prot = 104")
    with pytest.raises(ConfigError, match=r"unknown key 'node\.prot'"):
        load_config(path)


def test_wrong_type_is_named(tmp_path: Path):
    path = write_config(tmp_path, node="study_quiet_seconds = 'soon'")
    with pytest.raises(ConfigError, match=r"key 'node\.study_quiet_seconds'"):
        load_config(path)


def test_missing_models_is_named(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text("[node]\nport = 11112\n")
    with pytest.raises(ConfigError, match=r"missing key 'models'"):
        load_config(path)


def test_bad_ae_title_is_named(tmp_path: Path):
    path = write_config(tmp_path, node='allowed_calling_aets = ["WAY_TOO_LONG_AE_TITLE"]')
    with pytest.raises(ConfigError, match=r"key 'node\.allowed_calling_aets\[0\]'.*1 to 16"):
        load_config(path)


def test_missing_model_folder_is_named(tmp_path: Path):
    path = write_config(tmp_path, model_path=str(tmp_path / "model"))
    (tmp_path / "model").rmdir()
    with pytest.raises(ConfigError, match=r"models\.path.*no folder"):
        load_config(path)


def test_unknown_destination_of_model(tmp_path: Path):
    path = write_config(tmp_path, extra='destinations = ["nowhere"]')
    with pytest.raises(ConfigError, match="unknown destination 'nowhere'"):
        load_config(path)


def test_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")
