"""Judge a digits model the way a person would: are its samples recognisably the asked-for digit?

An independent classifier (an RBF support-vector machine on the 64 pixel values, trained on the
fixed digits *train* split and scored on the *test* split to show it is trustworthy) labels the
samples a class-conditional model draws with the deterministic EDM sampler (18 steps, 35
network evaluations). The score is the classifier's agreement with the requested class, averaged
over classes.

Next to it, a Fréchet distance on raw pixels (64-D, images scaled to [0, 1]): samples vs the 359
test images, and - as a yardstick - the 1438 train images vs the same test images. The yardstick
is the distance between two sets of real digits, so a model whose samples were as good as real
data would score *about* that much; it is not an exact floor, because the sample set has a
different size (10 x per_class, 500 by default, not 1438) and a Fréchet distance estimated from
finitely many images is biased upward by an amount that depends on how many there are (fewer
samples -> larger). Compare the two numbers as an order of magnitude, not digit by digit.

The model must be class-conditional on the 10 digit classes (label_dim 10) with 1x8x8 images;
anything else is an InputError.

Used by the slow quality test and by the demo; it needs scikit-learn and torch.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from edm_deploy.runtime.core.errors import InputError

from .dataset import load_digits_split


def as_denoiser(net: Any) -> Any:
    """A runtime denoiser as is; a torch preconditioner wrapped in the runtime's torch backend."""
    if not hasattr(net, "parameters"):
        return net
    from edm_deploy.runtime.backends.torch_backend import TorchDenoiser

    return TorchDenoiser.from_module(net, device="cpu")


def check_digits_model(den: Any) -> None:
    """A denoiser the digits classifier can judge: class-conditional, 10 classes, 1x8x8."""
    label_dim = int(getattr(den, "label_dim", 0) or 0)
    if label_dim == 0:
        raise InputError(
            "digits evaluation needs a class-conditional model (it asks for each digit 0-9 and checks what "
            "comes out); this model is unconditional (label_dim 0) - train with --cond"
        )
    if label_dim != 10:
        raise InputError(f"digits evaluation needs a model with the 10 digit classes, this one has label_dim {label_dim}")
    shape = (int(den.img_channels), int(den.img_resolution))
    if shape != (1, 8):
        raise InputError(
            f"digits evaluation needs a model of 1x8x8 images, this one makes {shape[0]}x{shape[1]}x{shape[1]}"
        )


def pixels(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [N,1,8,8] (or NHWC) -> float64 [N,64] in [0, 1]."""
    return np.asarray(images_uint8, dtype=np.float64).reshape(len(images_uint8), -1) / 255.0


def train_classifier():
    """(classifier, test accuracy): an RBF SVM on the digits train split's pixels."""
    from sklearn.svm import SVC

    tr_x, tr_y, te_x, te_y = load_digits_split()
    clf = SVC(C=10.0, gamma="scale")
    clf.fit(pixels(tr_x), tr_y)
    return clf, float((clf.predict(pixels(te_x)) == te_y).mean())


def sample_digits(net: Any, per_class: int = 50, seed: int = 0, num_steps: Optional[int] = 18, batch: int = 250,
                  **sampler_kwargs: Any):
    """uint8 [10*per_class,1,8,8] samples of a digits model and their requested classes (`sample_classes`)."""
    den = as_denoiser(net)
    check_digits_model(den)
    return sample_classes(den, per_class, seed, num_steps, batch, **sampler_kwargs)


def sample_classes(den: Any, per_class: int = 50, seed: int = 0, num_steps: Optional[int] = 18, batch: int = 250,
                   **sampler_kwargs: Any):
    """uint8 [label_dim*per_class,C,R,R] samples of a class-conditional model and their requested classes.

    Classes in blocks of `per_class`, seeds seed.. in order. Deterministic EDM sampler by default;
    `sampler_kwargs` choose another solver or schedule (`runtime.sampling.planner.plan_sampling`, e.g.
    ``solver="ipndm", nfe=5`` with ``num_steps=None``).
    """
    from edm_deploy.runtime.sampling.generate import quantize_uint8
    from edm_deploy.runtime.sampling.noise import StackedRandomGenerator, one_hot
    from edm_deploy.runtime.sampling.planner import plan_sampling

    den = as_denoiser(den)
    plan = plan_sampling(den, {"num_steps": num_steps, **sampler_kwargs})
    classes = np.repeat(np.arange(den.label_dim), per_class)
    seeds = seed + np.arange(len(classes))
    out = []
    for start in range(0, len(classes), batch):
        rnd = StackedRandomGenerator(seeds[start: start + batch])
        latents = rnd.randn((den.img_channels, den.img_resolution, den.img_resolution))
        labels = one_hot(classes[start: start + batch], den.label_dim)
        x = plan.run(den, den.to_device(latents) if hasattr(den, "to_device") else latents, labels, rnd.randn_like)
        out.append(quantize_uint8(x).transpose(0, 3, 1, 2))
    return np.concatenate(out), classes


def frechet_pixels(a_uint8: np.ndarray, b_uint8: np.ndarray) -> float:
    from edm_deploy.runtime.fid.fid_stats import frechet_distance

    a, b = pixels(a_uint8), pixels(b_uint8)
    return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))


def evaluate(net: Any, per_class: int = 50, seed: int = 0, num_steps: int = 18, classifier=None) -> dict:
    """Class accuracy of samples (mean over classes), per-class accuracy and pixel Fréchet distances."""
    check_digits_model(net)
    if classifier is None:
        classifier, clf_acc = train_classifier()
    else:
        clf_acc = None
    tr_x, _tr_y, te_x, _te_y = load_digits_split()
    samples, classes = sample_digits(net, per_class=per_class, seed=seed, num_steps=num_steps)
    return {
        **score_samples(samples, classes, classifier, te_x),
        "classifier_test_accuracy": clf_acc,
        "fd_train_test": frechet_pixels(tr_x, te_x),
        "num_samples": int(len(samples)),
        "samples": samples,
        "classes": classes,
    }


class DigitsJudge:
    """The demo's judge of a digits model: the SVM's agreement and the pixel Fréchet distance to the test split."""

    description = "RBF SVM on the digits train split (pixels)"
    distance = "Fréchet distance samples vs test (pixels)"

    def __init__(self) -> None:
        self.classifier, self.test_accuracy = train_classifier()
        tr_x, _, self.test_images, _ = load_digits_split()
        self.yardstick = frechet_pixels(tr_x, self.test_images)

    def check(self, den: Any) -> None:
        check_digits_model(den)

    def score(self, samples: np.ndarray, classes: np.ndarray) -> dict:
        return score_samples(samples, classes, self.classifier, self.test_images)


def score_samples(samples: np.ndarray, classes: np.ndarray, classifier: Any, test_images: np.ndarray) -> dict:
    """Per-class and mean classifier agreement with the requested classes, and the sample-vs-test FD."""
    pred = classifier.predict(pixels(samples))
    per = [float((pred[classes == c] == c).mean()) for c in range(int(classes.max()) + 1)]
    return {"accuracy": float(np.mean(per)), "per_class": per, "fd_samples_test": frechet_pixels(samples, test_images)}
