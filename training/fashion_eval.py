"""An independent Fashion-MNIST classifier: does a sample look like the class it was asked for?

Why: Inception FID costs minutes per 10,000 images on a CPU, too much for a solver x NFE grid or
an ablation of many settings. This small CNN, trained on the training split (and scored on the
test split, so its word can be weighed), gives two cheap judgements of 32x32 padded samples:
its accuracy against the requested classes, and a Fréchet distance in its 128-d penultimate
feature space ("classifier FD"), which ranks sample sets like FID does on this data at a
fraction of the cost. It is exported to ONNX, so judging needs only onnxruntime.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional

import numpy as np

from edm_deploy.runtime.core.errors import InputError

FEATURE_DIM = 128
CLASSIFIER_FILE = "classifier.onnx"


def _network():
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, FEATURE_DIM), nn.ReLU(),
    ), nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURE_DIM, 10))


def _scale(images_uint8: np.ndarray) -> np.ndarray:
    return (images_uint8.astype(np.float32) / 127.5 - 1.0).reshape(-1, 1, 32, 32)


def train_classifier(out_dir: str, epochs: int = 4, batch: int = 128, seed: int = 0,
                     echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the CNN on the training split, score it on the test split, export it; returns its record.

    The record (``classifier.json``) holds the test accuracy; `classifier.onnx` outputs
    ``logits`` [N, 10] and ``features`` [N, 128] for uint8-scaled input [N, 1, 32, 32].
    """
    import torch

    from edm_deploy.runtime.core.fileio import atomic_path, atomic_write_bytes

    from .dataset import load_fashion_mnist

    tr_x, tr_y = load_fashion_mnist("train")
    te_x, te_y = load_fashion_mnist("t10k")
    torch.manual_seed(seed)
    body, head = _network()
    model = torch.nn.Sequential(body, head)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all, y_all = torch.from_numpy(_scale(tr_x)), torch.from_numpy(tr_y)
    rng = np.random.RandomState(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(tr_x))
        for i in range(0, len(order), batch):
            idx = torch.from_numpy(order[i:i + batch])
            loss = torch.nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        echo(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(_scale(te_x[i:i + 1000]))) for i in range(0, len(te_x), 1000)])
    accuracy = float((logits.argmax(1).numpy() == te_y).mean())

    class Both(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = body, head

        def forward(self, x):
            f = self.body(x)
            return self.head(f), f

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CLASSIFIER_FILE)
    with atomic_path(path) as tmp:
        torch.onnx.export(Both().eval(), (torch.zeros(2, 1, 32, 32),), tmp, input_names=["images"],
                          output_names=["logits", "features"], dynamic_axes={"images": {0: "batch"}},
                          opset_version=17, dynamo=False)
    record = {"test_accuracy": accuracy, "epochs": epochs, "train_seconds": time.perf_counter() - start,
              "feature_dim": FEATURE_DIM}
    atomic_write_bytes(os.path.join(out_dir, "classifier.json"), json.dumps(record, indent=2).encode())
    echo(f"classifier: test-split accuracy {accuracy:.2%} ({record['train_seconds']:.0f} s)")
    return record


class FashionJudge:
    """The exported classifier, run with onnxruntime: class predictions and penultimate features."""

    def __init__(self, out_dir: str) -> None:
        import onnxruntime as ort

        path = os.path.join(out_dir, CLASSIFIER_FILE)
        if not os.path.isfile(path):
            raise InputError(f"{path} is missing: train the classifier first (train_classifier)")
        with open(os.path.join(out_dir, "classifier.json"), encoding="utf-8") as f:
            self.record = json.load(f)
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    @property
    def test_accuracy(self) -> float:
        return float(self.record["test_accuracy"])

    def run(self, images_uint8: np.ndarray, batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N,1,32,32] -> (predicted classes [N], features [N, 128] float64)."""
        if images_uint8.dtype != np.uint8 or images_uint8.shape[1:] != (1, 32, 32):
            raise InputError(f"the classifier takes uint8 [N, 1, 32, 32], got {images_uint8.dtype} "
                             f"{list(images_uint8.shape)}")
        preds, feats = [], []
        for i in range(0, len(images_uint8), batch):
            logits, f = self.session.run(None, {"images": _scale(images_uint8[i:i + batch])})
            preds.append(logits.argmax(1))
            feats.append(f.astype(np.float64))
        return np.concatenate(preds), np.concatenate(feats)

    def stats(self, images_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of the classifier features of a set of images."""
        from edm_deploy.runtime.fid.fid_stats import FeatureStats

        stats = FeatureStats(FEATURE_DIM)
        stats.update(self.run(images_uint8)[1])
        return stats.mean_cov()

    def score(self, images_uint8: np.ndarray, classes: np.ndarray,
              ref: Optional[tuple[np.ndarray, np.ndarray]] = None) -> dict[str, Any]:
        """Accuracy against the requested classes (overall and per class) and, given reference stats,
        the classifier FD."""
        from edm_deploy.runtime.fid.fid_stats import FeatureStats, frechet_distance

        preds, feats = self.run(images_uint8)
        classes = np.asarray(classes)
        out: dict[str, Any] = {"accuracy": float((preds == classes).mean()),
                               "per_class": [float((preds[classes == c] == c).mean()) for c in np.unique(classes)]}
        if ref is not None:
            stats = FeatureStats(FEATURE_DIM)
            stats.update(feats)
            out["classifier_fd"] = float(frechet_distance(*stats.mean_cov(), *ref))
        return out


class FashionDemoJudge:
    """The demo's judge of a Fashion-MNIST model: the classifier's agreement, and the Fréchet distance of its
    features to the test split's next to the training split's (the yardstick), trained once into `folder`."""

    distance = "Fréchet distance samples vs test (classifier features)"

    def __init__(self, folder: str, echo: Callable[[str], None] = print, epochs: int = 4) -> None:
        from .dataset import load_fashion_mnist

        if not os.path.exists(os.path.join(folder, "classifier.json")):
            train_classifier(folder, epochs=epochs, echo=echo)
        self.judge = FashionJudge(folder)
        self.test_accuracy = self.judge.test_accuracy
        self.description = f"a small CNN on the Fashion-MNIST training split ({self.judge.record['epochs']} epochs)"
        self.test_stats = self.judge.stats(load_fashion_mnist("t10k")[0])
        from edm_deploy.runtime.fid.fid_stats import frechet_distance

        self.yardstick = float(frechet_distance(*self.judge.stats(load_fashion_mnist("train")[0]), *self.test_stats))

    def check(self, den: Any) -> None:
        shape = (int(den.img_channels), int(den.img_resolution), int(getattr(den, "label_dim", 0) or 0))
        if shape != (1, 32, 10):
            raise InputError(f"the Fashion-MNIST judge needs a class-conditional 1x32x32 model with 10 classes, this "
                             f"one is {shape[0]}x{shape[1]}x{shape[1]} with label_dim {shape[2]}")

    def score(self, samples: np.ndarray, classes: np.ndarray) -> dict:
        out = self.judge.score(samples, classes, self.test_stats)
        out["fd_samples_test"] = out.pop("classifier_fd")
        return out
