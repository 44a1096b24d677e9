"""Find a model's nnU-Net trainer class and build its network, custom trainers included.

A checkpoint names the trainer it was trained with (`trainer_name`); the trainer's
`build_network_architecture` builds the network. nnU-Net's own loader
(`nnUNetPredictor.initialize_from_trained_model_folder`) looks the name up only inside the
installed nnunetv2 package (or folders in the process-wide `nnUNet_extTrainer` variable).
Here the model folder's own .py files are searched first, with nnU-Net's
`recursive_find_python_class` (the function behind nnUNet_extTrainer): the folder is on
sys.path only while its modules are imported and they are removed from sys.modules
afterwards, so two model folders may ship modules of the same name and nothing is installed.
Then nnunetv2's own trainers (nnUNetTrainer, nnUNetTrainerNoMirroring, ...).

`build_network` calls `build_network_architecture` in any of the three signatures nnU-Net has
had: 2.1-2.3 (plans_manager, dataset_json, configuration_manager, ...), 2.4-2.7 (architecture
class name and kwargs) and 2.8 (plans_manager, configuration_manager, ...).
"""

from __future__ import annotations

import inspect
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

_IMPORT_LOCK = threading.Lock()  # sys.path and sys.modules are process-wide


class TrainerNotFound(LookupError):
    """The trainer class named by a checkpoint is nowhere to be found."""


def source_file(cls: type) -> str:
    """The .py file `cls` was defined in. `inspect.getfile` cannot tell for a class from a model
    folder (its module is gone from sys.modules), so the file comes from its methods' code."""
    for value in vars(cls).values():
        code = getattr(getattr(value, "__func__", value), "__code__", None)
        if code is not None:
            return code.co_filename
    module = sys.modules.get(cls.__module__)
    return getattr(module, "__file__", None) or f"module {cls.__module__}"


def find_trainer_class(name: str, code_folders: Sequence[Path]) -> type:
    """The nnUNetTrainer subclass called `name`: from the model's code folders, else nnunetv2."""
    import nnunetv2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    found = None
    with _IMPORT_LOCK:
        for folder in code_folders:
            found = recursive_find_python_class(str(folder), name, None, base_folder=str(folder),
                                                cleanup_imports_from_base_folder=True)
            if found is not None:
                break
    if found is None:
        package = Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"
        found = recursive_find_python_class(str(package), name, "nnunetv2.training.nnUNetTrainer",
                                            nnunetv2.__path__[0])
    if found is None:
        looked = [f"{f}/*.py" for f in code_folders] or ["the model folder (it has no .py files)"]
        looked.append(f"nnunetv2's trainers ({package})")
        raise TrainerNotFound(f"trainer class {name!r} not found; looked in: " + "; ".join(looked))
    if not (isinstance(found, type) and issubclass(found, nnUNetTrainer)):
        raise TrainerNotFound(f"{name!r} in {source_file(found)} is not an nnUNetTrainer subclass")
    return found


def build_network(trainer_class: type, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                  dataset_json: dict, num_input_channels: int, num_output_channels: int) -> torch.nn.Module:
    """The trainer's network for inference (deep supervision off), in the trainer's signature."""
    build = trainer_class.build_network_architecture
    params = list(inspect.signature(build).parameters)
    if params[:2] == ["plans_manager", "dataset_json"]:  # nnU-Net 2.1-2.3, e.g. STU-Net's trainers
        return build(plans_manager, dataset_json, configuration_manager, num_input_channels,
                     enable_deep_supervision=False)
    if "plans_manager" in params:  # nnU-Net 2.8
        return build(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                     enable_deep_supervision=False)
    return build(configuration_manager.network_arch_class_name,  # nnU-Net 2.4-2.7
                 configuration_manager.network_arch_init_kwargs,
                 configuration_manager.network_arch_init_kwargs_req_import,
                 num_input_channels, num_output_channels, enable_deep_supervision=False)
