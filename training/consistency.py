"""Which checkpoints consistency tuning starts from, and what a tuned checkpoint records.

ECT (Geng et al. 2024) tunes a denoiser trained with EDM's preconditioning and loss: its
objective (`training.consistency_loss.ECTLoss`) draws t as EDM does and compares the network
with itself at two noise levels, which presumes EDM's c_skip / c_out / c_in / c_noise and its
sigma range. So the teacher must be an `EDMPrecond` network; VP, VE and iDDPM networks are
refused (their inner network was trained on another input scaling and noise embedding, so ECT's
parametrisation would not mean what it means for them), and so is a model that is already
consistency-tuned (continue its run with ``--resume`` instead).

The tuned network is the teacher's network description with the run's dropout and use_fp16
(neither changes the weights' names or shapes) plus a ``consistency`` entry::

    {"method": "ect", "from_checkpoint": "ckpt.pt", "from_sha256": "<64 hex>", "from_kimg": 150.0}

It rides with the network description into every checkpoint and snapshot of the run, and from
there into every exported manifest (`checkpoint.network_manifest` lifts it to the manifest's
top-level ``consistency`` field, `runtime.core.manifest.consistency_record` checks it), so a runtime
knows that the model wants the consistency sampler, and from which checkpoint it was made.
"""

from __future__ import annotations

import copy
import os

from edm_deploy.runtime.core.errors import InputError
from edm_deploy.runtime.core.manifest import CONSISTENCY_KEY, consistency_record

from .checkpoint import load_checkpoint

METHOD = "ect"
TEACHER_CLASS = "EDMPrecond"


def load_teacher(path: str) -> dict:
    """The checkpoint `path`, checked to be an EDM-preconditioned model that consistency tuning can start from."""
    ckpt = load_checkpoint(path)
    network = ckpt["network"]
    if network["class_name"] != TEACHER_CLASS:
        raise InputError(
            f"{path} holds a {network['class_name']} network; consistency tuning (ECT) starts from an EDM-"
            f"preconditioned one ({TEACHER_CLASS}) and does not support VP, VE or iDDPM models (their network "
            f"was trained on another input scaling and noise embedding than ECT's EDM parametrisation)",
            param="tune_from")
    record = consistency_record(network.get(CONSISTENCY_KEY), path)
    if record is not None:
        raise InputError(
            f"{path} is already consistency-tuned (from {record.get('from_checkpoint', '?')}); tune the EDM model "
            f"it came from, or continue its run with --resume", param="tune_from")
    return ckpt


def tuned_network(teacher: dict, path: str, sha256: str, dropout: float, use_fp16: bool) -> dict:
    """The tuned run's network description: the teacher's, its dropout and use_fp16 set, with the record."""
    network = copy.deepcopy(teacher["network"])
    network["init_kwargs"]["dropout"] = float(dropout)
    network["init_kwargs"]["use_fp16"] = bool(use_fp16)
    kimg = (teacher.get("meta") or {}).get("kimg")
    network[CONSISTENCY_KEY] = {
        "method": METHOD, "from_checkpoint": os.path.basename(path), "from_sha256": sha256,
        "from_kimg": float(kimg) if isinstance(kimg, (int, float)) else None,
    }
    return network


def check_tuning_fits(network: dict, source: str, cond: bool, augment: float) -> None:
    """The run's cond and augmentation must suit the network being tuned."""
    kwargs = network["init_kwargs"]
    label_dim = int(kwargs.get("label_dim", 0) or 0)
    if label_dim and not cond:
        raise InputError(f"{source} is class-conditional ({label_dim} classes): tune it with cond (--cond)",
                         param="cond")
    if cond and not label_dim:
        raise InputError(f"{source} is unconditional: tune it without cond (--uncond)", param="cond")
    if augment > 0 and not int(kwargs.get("augment_dim", 0) or 0):
        raise InputError(f"{source} was trained without augmentation labels (augment_dim 0), so it cannot be tuned "
                         f"with augment {augment:g}; tune with augment 0", param="augment")

