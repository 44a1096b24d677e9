"""`dicomnode models check`: broken model folders and configs are named with their reason; a
sound one passes (table and --json, exit codes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from dicomnode.cli import app

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "demo-petct"
DESTINATION = '\n[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n'


def _model_folder(tmp_path: Path, folds=(0, 1, 2, 3, 4), dataset_edit=None) -> Path:
    """The demo model's files, linked (checkpoints) or copied (JSON) into a folder of our own."""
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(DEMO / "plans.json", folder)
    dataset = json.loads((DEMO / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps(dataset_edit(dataset) if dataset_edit else dataset))
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
        (folder / f"fold_{fold}" / "checkpoint_final.pth").symlink_to(DEMO / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


def _check(
    tmp_path: Path,
    folder: Path,
    extra: str = "",
    destinations: str = DESTINATION,
    dry_run: str = "--no-dry-run",
    folds: str = "[0, 1, 2, 3, 4]",
):
    config = tmp_path / "config.toml"
    config.write_text(
        f'[node]\ndata_dir = "var"\n{destinations}\n[[models]]\nname = "m"\npath = "{folder}"\n'
        f"folds = {folds}\n{extra}\n"
    )
    result = CliRunner().invoke(app, ["models", "check", "--config", str(config), "--json", dry_run])
    [report] = json.loads(result.stdout[result.stdout.index("[") :])  # nnU-Net may print before it
    return result.exit_code, report


def test_sound_model_passes(tmp_path: Path):
    code, report = _check(tmp_path, _model_folder(tmp_path))
    assert (code, report["ok"], report["problems"]) == (0, True, [])
    assert report["labels"] == {"background": 0, "lesion": 1} and report["dry_run"] == "skipped"


def test_missing_fold(tmp_path: Path):
    code, report = _check(tmp_path, _model_folder(tmp_path, folds=(0, 1, 2, 3)))
    assert code == 1 and report["ok"] is False
    assert report["problems"] == [f"fold 4: missing fold_4/checkpoint_final.pth in {tmp_path / 'model'}"]


def test_wrong_channel_count(tmp_path: Path):
    code, report = _check(tmp_path, _model_folder(tmp_path), 'channels = ["CT"]')
    assert code == 1 and report["problems"] == [
        "channels: the model takes 2 channels ['CT', 'PET'], the configuration gives 1"
    ]


def test_unknown_trainer_class(tmp_path: Path):
    import torch

    folder = _model_folder(tmp_path)
    for fold in range(5):
        target = folder / f"fold_{fold}" / "checkpoint_final.pth"
        checkpoint = torch.load(target, map_location="cpu", weights_only=False)
        checkpoint["trainer_name"] = "nnUNetTrainer_NotShipped"
        target.unlink()
        torch.save(checkpoint, target)
    code, report = _check(tmp_path, folder)
    assert code == 1 and len(report["problems"]) == 1
    assert report["problems"][0].startswith("trainer: trainer class 'nnUNetTrainer_NotShipped' not found")


def test_uncoded_labels(tmp_path: Path):
    def organs(dataset: dict) -> dict:
        return {**dataset, "labels": {"background": 0, "spleen": 1, "liver": 2}}

    code, report = _check(tmp_path, _model_folder(tmp_path, dataset_edit=organs))
    assert code == 1 and report["problems"] == [
        "labels: model m: no code for labels 1 (spleen), 2 (liver) (config label_codes or the model folder's "
        "label_codes.json)"
    ]
    # Coded in the config: fine; a code for a label the model lacks: named.
    coded = "\n".join(
        f'[models.label_codes.{v}]\nname = "{n}"\ncategory = ["123037004", "SCT", "Anatomical Structure"]\n'
        f'type = ["{t}", "SCT", "{n}"]'
        for v, n, t in ((1, "spleen", "78961009"), (2, "liver", "10200004"), (3, "aorta", "15825003"))
    )
    code, report = _check(tmp_path, tmp_path / "model", coded)
    assert report["problems"] == ["labels: label_codes names label value(s) [3], which the model does not have"]


def test_region_based_labels_are_listed_by_the_values_the_map_holds(tmp_path: Path):
    def regions(dataset: dict) -> dict:
        return {
            **dataset,
            "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3},
            "regions_class_order": [1, 2, 3],
        }

    code, report = _check(tmp_path, _model_folder(tmp_path, dataset_edit=regions))
    assert report["labels"] == {
        "background": 0,
        "whole tumor without tumor core": 1,
        "tumor core without enhancing tumor": 2,
        "enhancing tumor": 3,
    }
    assert code == 1 and report["problems"] == [
        "labels: model m: no code for labels 1 (whole tumor without tumor core), "
        "2 (tumor core without enhancing tumor), 3 (enhancing tumor) "
        "(config label_codes or the model folder's label_codes.json)"
    ]


def test_channels_without_patterns_and_channel_order(tmp_path: Path):
    folder = _model_folder(tmp_path)
    mr = 'channels = ["FLAIR", "T1"]\n[models.inputs.FLAIR]\nseries_description = ["*flair*"]\n[models.inputs.T1]\n'
    code, report = _check(tmp_path, folder, mr)
    assert code == 1 and report["problems"] == [
        "channels: T1 takes any MR series, as do the other MR channels (FLAIR, T1): "
        "set series_description patterns in [models.inputs.T1]"
    ]
    code, report = _check(tmp_path, folder, 'channels = ["PET", "CT"]')
    assert code == 1 and report["problems"] == [
        "channels: config channels ['PET', 'CT'] are in another order than dataset.json's channel_names "
        "['CT', 'PET']: channels are filled by position"
    ]


def test_no_destination_and_table(tmp_path: Path):
    folder = _model_folder(tmp_path)
    code, report = _check(tmp_path, folder, destinations="")
    assert code == 1 and report["problems"] == [
        "outputs: no destination receives this model's results (config [[destinations]])"
    ]
    table = CliRunner().invoke(app, ["models", "check", "--config", str(tmp_path / "config.toml"), "--no-dry-run"])
    assert table.exit_code == 1 and "outputs:" in table.output and "1 lesion" in table.output


def test_unknown_model_name(tmp_path: Path):
    _check(tmp_path, _model_folder(tmp_path))
    result = CliRunner().invoke(app, ["models", "check", "nope", "--config", str(tmp_path / "config.toml")])
    assert result.exit_code == 2 and "no model named 'nope'" in result.output


def test_dry_run(tmp_path: Path):
    """One fold of the demo model loads and segments a small synthetic array on the CPU."""
    code, report = _check(
        tmp_path, _model_folder(tmp_path, folds=(0,)), 'device = "cpu"', DESTINATION, "--dry-run", folds="[0]"
    )
    assert (code, report["problems"]) == (0, [])
    assert report["dry_run"].endswith("s on cpu") and " label values in " in report["dry_run"]
