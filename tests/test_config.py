from pathlib import Path

import pytest

from dicomnode.config import ConfigError, load_config

from tests.support.nodeutil import REPO, write_config


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


MR_MODEL = '''
channels = ["FLAIR", "T1", "T1CE", "T2"]
grid = "T1CE"
configuration = "3d_fullres"
tile_step_size = 0.7
label_codes = "codes.json"
[models.inputs.FLAIR]
series_description = ["*flair*"]
[models.inputs.T1]
series_description = ["*t1*"]
exclude_series_description = ["*post*"]
[models.inputs.T1CE]
series_description = ["*t1*post*"]
[models.inputs.T2]
series_description = ["*t2*"]
exclude_series_description = ["*flair*"]
[models.applies_to]
tags = { StudyDescription = ["*brain*"] }
'''


def test_named_mr_channels(tmp_path: Path):
    model = load_config(write_config(tmp_path, extra=MR_MODEL)).models[0]
    assert model.channels == ["FLAIR", "T1", "T1CE", "T2"] and model.grid == "T1CE"
    assert model.required_modalities == ["MR"]  # derived from the channels
    assert model.inputs.named("T1").exclude_series_description == ["*post*"]
    assert model.inputs.named("T1").modality == "MR" and model.inputs.named("CT") is None
    assert model.label_codes == tmp_path / "codes.json"  # relative to the config file
    assert model.applies_to.tags == {"StudyDescription": ["*brain*"]} and model.tile_step_size == 0.7


def test_defaults_follow_the_channels(tmp_path: Path):
    ct_only = load_config(write_config(tmp_path, extra='channels = ["CT"]')).models[0]
    assert ct_only.grid == "CT" and ct_only.required_modalities == ["CT"]
    petct = load_config(write_config(tmp_path)).models[0]
    assert petct.grid == "PET" and petct.required_modalities == ["CT", "PT"]


def test_inline_label_codes(tmp_path: Path):
    extra = '''channels = ["CT"]
[models.label_codes.5]
name = "liver"
category = ["123037004", "SCT", "Anatomical Structure"]
type = ["10200004", "SCT", "Liver"]
'''
    [(value, code)] = load_config(write_config(tmp_path, extra=extra)).models[0].label_codes.items()
    assert value == 5 and code.name == "liver" and (code.type.value, code.type.scheme) == ("10200004", "SCT")


@pytest.mark.parametrize(
    "edit, key, message",
    [
        (('grid = "T1CE"', 'grid = "T3"'), r"models\[0\]\.grid", "needs a T3 channel"),
        (
            ("[models.inputs.T2]", "[models.inputs.T3]"),
            r"models\[0\]\.inputs",
            r"channel 'T2' needs a \[models\.inputs\.T2\] table",
        ),
        (("StudyDescription", "StudyDescr"), r"models\[0\]\.applies_to\.tags\.StudyDescr", "StudyDescription"),
        (
            ('series_description = ["*t2*"]', "series_desc = 1"),
            r"unknown key 'models\[0\]\.inputs\.T2\.series_desc'",
            "",
        ),
        (("tile_step_size = 0.7", "tile_step_size = 0"), r"models\[0\]\.tile_step_size", "greater than 0"),
        (
            ('channels = ["FLAIR", "T1", "T1CE", "T2"]', 'channels = ["FLAIR", "T1", "T1CE", "T2", "T1"]'),
            r"models\[0\]\.channels",
            "distinct",
        ),
    ],
)
def test_model_errors_name_the_key(tmp_path: Path, edit, key, message):
    path = write_config(tmp_path, extra=MR_MODEL.replace(*edit))
    with pytest.raises(ConfigError, match=f"{key}.*{message}"):
        load_config(path)


def test_label_code_needs_value_scheme_and_meaning(tmp_path: Path):
    extra = ('channels = ["CT"]\n[models.label_codes.1]\nname = "liver"\ncategory = ["123037004", "SCT"]\n'
             'type = ["10200004", "SCT", "Liver"]\n')
    with pytest.raises(
        ConfigError, match=r"key 'models\[0\]\.label_codes\.1\.category'.*\[value, scheme designator, meaning\]"
    ):
        load_config(write_config(tmp_path, extra=extra))


def test_inputs_table_for_no_channel(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"\[models\.inputs\.FLAIR\] names no channel of the model"):
        load_config(write_config(tmp_path, extra='[models.inputs.FLAIR]\nseries_description = ["*flair*"]'))


SOURCES = """
[[sources]]
name = "pacs"
ae_title = "PACS"
host = "pacs.example.org"
port = 104
retrieve = "C-GET"
tls = { ca_certificates = "tls/ca.pem" }

[[sources]]
name = "web"
url = "https://pacs.example.org/dicom-web"
authorization_file = "secrets/token"
"""


def test_sources_dimse_and_dicomweb(tmp_path: Path):
    from dicomnode.config import RetrieveMethod

    config = load_config(write_config(tmp_path, extra=SOURCES + '[models.priors]\nsource = "web"\n'))
    pacs, web = config.sources
    assert (pacs.retrieve, pacs.is_dicomweb, web.is_dicomweb) == (RetrieveMethod.C_GET, False, True)
    assert pacs.tls.ca_certificates == tmp_path / "tls" / "ca.pem"
    assert web.authorization_file == tmp_path / "secrets" / "token"
    assert config.models[0].priors.source == "web" and config.models[0].priors.modalities == ["PT"]
    assert config.fetch_source("web") is web


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ('name = "a"\nae_title = "PACS"\nhost = "h"',
         "a DIMSE source 'a' needs ae_title, host and port \\(missing port\\)"),
        ('name = "a"\nurl = "https://h/dicom-web"\nae_title = "PACS"',
         "a source is either DIMSE .* or DICOMweb .*: drop ae_title or url"),
        ('name = "a"\nurl = "ftp://h"', "url must be http://host"),
        ('name = "a"\nae_title = "P"\nhost = "h"\nport = 104\nauthorization_env = "X"', "authorization_.* DICOMweb"),
        ('name = "a"\nae_title = "P"\nhost = "h"\nport = 104\nretrieve = "C-FIND"', "key 'sources.*retrieve'"),
    ],
)
def test_source_errors_are_named(tmp_path: Path, source: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, extra=f"[[sources]]\n{source}\n"))


def test_priors_name_a_source(tmp_path: Path):
    with pytest.raises(ConfigError, match="priors.source 'nope' names no source"):
        load_config(write_config(tmp_path, extra='[models.priors]\nsource = "nope"\n'))


def test_compare_settings(tmp_path: Path):
    config = load_config(write_config(tmp_path, extra=SOURCES + '[models.compare]\nsource = "pacs"\n'
                                      'liver_from = "organs-ct"\nmodalities = ["pt", "CT"]\n'))
    compare = config.models[0].compare
    assert config.models[0].compares and not load_config(write_config(tmp_path)).models[0].compares
    assert (compare.enabled, compare.max_age_days, compare.modalities, compare.source) == (True, 365, ["PT", "CT"],
                                                                                           "pacs")
    assert (compare.liver_from, compare.liver_label) == ("organs-ct", "liver")  # not configured: said at run time
    off = load_config(write_config(tmp_path, extra="[models.compare]\nenabled = false\n")).models[0]
    assert off.compare is not None and not off.compares


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[models.compare]\nsource = "nope"\n', "compare.source 'nope' names no source"),
        ('[models.compare]\nliver_from = "demo-petct"\n', "cycle of models .*: demo-petct -> demo-petct"),
        ('channels = ["CT"]\n[models.compare]\n', "measures PET lesions: the model has no PET channel"),
        ("[models.compare]\nmax_age_days = 0\n", r"key 'models\[0\].compare.max_age_days': Input should be greater"),
    ],
)
def test_compare_errors_are_named(tmp_path: Path, extra: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, extra=extra))


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:1", "cuda:15"])
def test_device_strings_accepted(tmp_path: Path, device: str):
    config = load_config(write_config(tmp_path, extra=f'device = "{device}"\n'))
    assert config.models[0].device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:-1", "cuda:01", "cuda:x", "CUDA:1", "cuda 1", "mps"])
def test_bad_device_strings_named(tmp_path: Path, device: str):
    with pytest.raises(ConfigError, match=r"key 'models\[0\]\.device': .*\"cuda:N\""):
        load_config(write_config(tmp_path, extra=f'device = "{device}"\n'))


def test_workers_one_per_device(tmp_path: Path):
    extra = 'fold_parallel = true\n' + "".join(
        f'[[workers]]\ndevice = "{d}"\n' for d in ("cuda:0", "cuda:1", "cpu", "cpu"))
    config = load_config(write_config(tmp_path, extra=extra))
    assert [(s.name, s.device, s.index) for s in config.worker_specs()] == [
        ("worker-cuda0", "cuda:0", 0), ("worker-cuda1", "cuda:1", 1), ("worker-cpu-1", "cpu", 2),
        ("worker-cpu-2", "cpu", 3)]
    assert config.fold_devices() == ["cuda:0", "cuda:1", "cpu", "cpu"]
    assert config.models[0].fold_parallel is True


def test_node_workers_count(tmp_path: Path):
    config = load_config(write_config(tmp_path, node="workers = 3"))
    assert [(s.name, s.device, s.index) for s in config.worker_specs()] == [
        ("worker-0", None, 0), ("worker-1", None, 1), ("worker-2", None, 2)]
    assert config.fold_devices() == []
    single = load_config(write_config(tmp_path / "one"))
    assert [(s.name, s.device) for s in single.worker_specs()] == [("worker", None)]


@pytest.mark.parametrize(("node", "extra", "message"), [
    ("workers = 3", '[[workers]]\ndevice = "cuda:0"\n[[workers]]\ndevice = "cuda:1"\n',
     "workers = 3 but 2 \\[\\[workers\\]\\] tables"),
    ("", '[[workers]]\ndevice = "cuda:9x"\n', r"key 'workers\[0\]\.device'"),
    ("", '[[workers]]\ndevice = "cpu"\nname = "a"\n[[workers]]\ndevice = "cpu"\nname = "a"\n',
     "worker names must be unique"),
    ("workers = 0", "", r"key 'node\.workers'"),
])
def test_worker_errors_are_named(tmp_path: Path, node: str, extra: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, node=node, extra=extra))
