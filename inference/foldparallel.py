"""One case's folds run at once on several devices (`[[models]] fold_parallel`), to cut the
latency of one urgent study on a workstation with several GPUs.

nnU-Net ensembles folds one after the other on one device (nnUNetPredictor.
predict_logits_from_preprocessed_data: each fold's sliding-window logits moved to the CPU, summed
in fold order in float16, divided by the number of folds). Here each device gets a replica of
the network and its share of the folds (fold k on device k mod n); the replicas run in threads
(torch releases the GIL in its kernels) and the folds' logits are summed on the CPU in fold
order, in the same dtype, then divided as nnU-Net does: the same arithmetic, so the same result
as the sequential ensemble (tests/inference/test_fold_parallel.py checks it bit for bit).

On the CPU the same replicas run a case's folds one per core (`[[models]] cpu_fold_per_core`,
inference/model.py), each replica's thread with its share of torch's intra-op threads (one on
two cores); the thread count moves a logit in its last bits, so there the label map, not the
logits, equals the sequential one.

No DICOM here: this module must never import pydicom, pynetdicom or highdicom.
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor


class Replica:
    """The network on one device with the weights of the folds it runs (by fold position);
    `threads`: torch's intra-op threads in the replica's own thread (None: torch's setting)."""

    def __init__(self, device: str, predictor: nnUNetPredictor, folds: Sequence[int],
                 threads: int | None = None) -> None:
        self.device, self.predictor, self.folds, self.threads = device, predictor, tuple(folds), threads

    def fold_logits(self, data: torch.Tensor, parameters: Sequence[dict]) -> dict[int, torch.Tensor]:
        """Each of this replica's folds' logits over the whole (preprocessed) case, on the CPU."""
        import torch

        out = {}
        if self.threads:
            torch.set_num_threads(self.threads)  # this thread's; ensemble_logits restores the caller's
        with torch.inference_mode():
            for position in self.folds:
                self.predictor.network.load_state_dict(parameters[position])
                out[position] = self.predictor.predict_sliding_window_return_logits(data).to("cpu")
        return out


def make_replicas(devices: Sequence[str], main: nnUNetPredictor, n_folds: int, make_predictor,  # noqa: ANN001
                  threads: int | None = None) -> list[Replica]:
    """One replica per entry of `devices` (a device may repeat: two replicas on it); the first one
    is `main` itself (its network, already on devices[0]); `make_predictor(device)` makes the
    nnUNetPredictor of another. Fold position k goes to replica k mod len(devices); a replica
    without folds is not made. `threads`: each replica's intra-op threads (the CPU's folds one
    per core: 1); then the folds short of a full round go to no replica (ensemble_logits runs them
    on all threads after the others)."""
    replicas = []
    # with `threads` (the CPU's cores) the folds that do not make a full round (5 folds on 2 cores:
    # the fifth) are left to ensemble_logits, which runs them on every thread after the rounds
    shared = n_folds - n_folds % len(devices) if threads else n_folds
    for index, device in enumerate(devices[:n_folds]):
        folds = list(range(index, shared, len(devices)))
        if index == 0:
            predictor = main
        else:
            predictor = make_predictor(device)
            predictor.manual_initialization(
                copy.deepcopy(main.network).to(device), main.plans_manager, main.configuration_manager,
                None, main.dataset_json, main.trainer_name, main.allowed_mirroring_axes)
        replicas.append(Replica(device, predictor, folds, threads))
    return replicas


def ensemble_logits(replicas: Sequence[Replica], data: torch.Tensor, parameters: Sequence[dict]) -> torch.Tensor:
    """The folds' logits averaged as nnU-Net averages them: run at once on the replicas, summed in
    fold order on the CPU, divided by the number of folds (when more than one)."""
    import torch

    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(max_workers=len(replicas), thread_name_prefix="fold") as pool:
            futures = [pool.submit(replica.fold_logits, data, parameters) for replica in replicas]
            by_fold: dict[int, torch.Tensor] = {}
            for future in futures:
                by_fold.update(future.result())
    finally:
        # a replica's torch.set_num_threads is also the default of threads started later: set it back
        torch.set_num_threads(threads)
    leftover = [position for position in range(len(parameters)) if position not in by_fold]
    if leftover:  # folds short of a full round: on the first replica, with all the caller's threads
        by_fold.update(Replica(replicas[0].device, replicas[0].predictor, leftover).fold_logits(data, parameters))
    with torch.inference_mode():
        prediction = by_fold.pop(0)
        for position in range(1, len(parameters)):
            prediction += by_fold.pop(position)
        if len(parameters) > 1:
            prediction /= len(parameters)
    return prediction
