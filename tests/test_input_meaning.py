"""Nothing silently means something else (issue 23, section 3).

Each class is a value that used to be read as another one without a word: a time-point list
with an empty entry or entries of the wrong type, a seed that is not an integer in [0, 2^32)
(one check for the CLI, the API and any server), a class label of the wrong type, dataset
labels that `train` then refuses, a symlinked output replaced by a file, and a schedule file
spent with other settings than it was searched for.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from edm_deploy.runtime.core.errors import InputError
from tests.conftest import has_module, one_error_line, requires_onnx, run_main

# -- time points -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("80,,1", "empty entry \\(number 2\\)"),
    ("80,1,", "empty entry \\(number 3\\)"),
    (",80,1", "empty entry \\(number 1\\)"),
    ("80, ,1", "empty entry \\(number 2\\)"),
    ("80;1", "comma-separated numbers"),
])
def test_a_sigma_list_with_a_hole_or_a_typo_is_refused(text, message):
    from edm_deploy.runtime.sampling.schedule_file import parse_sigmas

    with pytest.raises(InputError, match=message) as info:
        parse_sigmas(text)
    assert info.value.param == "sigmas"


@pytest.mark.parametrize("content, message", [
    (["80", "1"], "sigmas\\[0\\] = '80' is a str"),
    ([80, True], "sigmas\\[1\\] = True is a bool"),
    ([True, False], "sigmas\\[0\\] = True is a bool"),
    ({"sigmas": "80,1"}, "must be a list of numbers"),
    ({"sigmas": [80, None]}, "sigmas\\[1\\] = None is a NoneType"),
    ({"sigmas": [80, {"v": 1}]}, "is a dict"),
])
def test_a_schedule_file_of_non_numbers_is_refused(content, message, tmp_path):
    from edm_deploy.runtime.sampling.schedule_file import read_schedule

    path = tmp_path / "s.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InputError, match=message) as info:
        read_schedule(str(path))
    assert info.value.param == "sigmas" and str(path) in str(info.value)


def test_the_api_takes_numbers_only_as_time_points():
    from edm_deploy.runtime.core.schedules import check_sigma_list

    for bad in (np.array(["80", "1"]), np.array([True, False]), "80,1", [np.bool_(True), 1.0]):
        with pytest.raises(InputError, match="numbers"):
            check_sigma_list(bad)
    assert check_sigma_list(np.array([80, 1], dtype=np.int32)).tolist() == [80.0, 1.0]
    assert check_sigma_list([np.float32(80), 1, 0.0]).tolist() == [80.0, 1.0, 0.0]
    if has_module("torch"):
        import torch

        assert check_sigma_list(torch.tensor([80.0, 1.0])).tolist() == [80.0, 1.0]  # scalars with __float__


# -- seeds: one check ---------------------------------------------------------------------------


BAD_SEEDS = {
    "2^32 (would repeat seed 0)": ([2**32], "seeds\\[0\\] = 4294967296 is not a seed.*repeat the noise of seed 0"),
    "a float": ([1.9], "seeds\\[0\\] must be an integer seed, got 1.9"),
    "a whole float": ([np.float64(2.0)], "2.0\\) \\(float64\\)"),
    "a string of digits": ("01", "got the text '01'"),
    "strings in a list": (["0", "1"], "seeds\\[0\\] must be an integer seed, got '0'"),
    "a bool": ([True], "got True \\(bool\\)"),
    "negative": ([-1], "seeds\\[0\\] = -1 is not a seed"),
    "repeated": ([3, 4, 3], "repeats seed 3"),
    "empty": ([], "is empty"),
    "one bare int": (5, "single int 5"),
    "a 2-D array": (np.zeros((2, 2), dtype=np.int64), "flat list"),
    "past the end of a range": (range(2**32 - 1, 2**32 + 1), "seeds\\[1\\] = 4294967296"),
}


@pytest.mark.parametrize("case", sorted(BAD_SEEDS))
def test_one_seed_check_refuses_what_is_not_a_seed(case):
    from edm_deploy.runtime.sampling.noise import StackedRandomGenerator
    from edm_deploy.runtime.sampling.seeds import check_seeds

    seeds, message = BAD_SEEDS[case]
    with pytest.raises(InputError, match=message) as info:
        check_seeds(seeds)
    assert info.value.param == "seeds"
    if case != "repeated":  # the random streams themselves refuse the same (a repeat is allowed there)
        with pytest.raises(InputError, match=message):
            StackedRandomGenerator(seeds)


def test_one_seed_check_takes_every_honest_spelling():
    from edm_deploy.runtime.sampling.seeds import MAX_SEEDS, check_seeds

    assert check_seeds(range(3)) == check_seeds(np.arange(3)) == check_seeds(iter([0, 1, 2])) == [0, 1, 2]
    assert check_seeds((np.uint32(2**32 - 1),)) == [2**32 - 1]
    assert check_seeds([1, 1], unique=False) == [1, 1]
    with pytest.raises(InputError, match="more than one run takes"):
        check_seeds(range(MAX_SEEDS + 1))  # counted, not built
    with pytest.raises(InputError, match="more than one run takes"):
        check_seeds(iter(range(10**12)))  # an iterator is read only up to the limit


def test_the_api_refuses_a_seed_past_2_to_the_32():
    """The random streams check every seed they are given, whatever front end gave it."""
    import edm_deploy
    from edm_deploy.runtime import GaussianDenoiser

    den = GaussianDenoiser(1, 4)
    with pytest.raises(InputError) as info:
        edm_deploy.generate(den, seeds=[2**32], num_steps=2)
    assert info.value.param == "seeds"
    assert edm_deploy.generate(den, seeds=[2**32 - 1], num_steps=2).shape == (1, 4, 4, 1)


@pytest.mark.parametrize("seeds", [[1.9], "01"], ids=["1.9", "'01'"])
def test_the_api_refuses_seeds_that_int_would_turn_into_others(seeds):
    import edm_deploy
    from edm_deploy.runtime import GaussianDenoiser

    with pytest.raises(InputError) as info:
        edm_deploy.generate(GaussianDenoiser(1, 4), seeds=seeds, num_steps=2)
    assert info.value.param == "seeds"


# -- class labels -------------------------------------------------------------------------------


@pytest.mark.parametrize("value, message", [
    ("3", "must be an integer class label, got '3' \\(str\\)"),
    (3.7, "must be an integer class label, got 3.7 \\(float\\)"),
    (True, "got True \\(bool\\)"),
    (10, "class_idx 10 is out of range: this model has classes 0..9"),
    (-1, "out of range"),
])
def test_a_class_of_the_wrong_type_is_a_type_error_not_out_of_range(value, message):
    from edm_deploy.runtime.sampling.noise import check_class

    with pytest.raises(InputError, match=message) as info:
        check_class(value, 10)
    assert info.value.param == "class_idx"
    check_class(np.int64(9), 10)


# -- dataset labels: what `dataset` writes, `train` reads --------------------------------------


@pytest.mark.parametrize("label, message", [
    (-5, "is -5; class labels must lie in 0..99999"),
    (10**9, "is 1000000000; class labels must lie in 0..99999"),
    ("3", "must be an integer class label, got '3'"),
    (3.7, "got 3.7"),
    (True, "got True"),
])
def test_dataset_refuses_labels_train_would_refuse(label, message, tmp_path, capsys):
    from PIL import Image

    from edm_deploy.training.dataset import open_dataset

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("L", (8, 8)).save(src / name)
    (src / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0], ["b.png", label]]}))
    dest = tmp_path / "d.zip"
    code, _, err = run_main(["dataset", "--source", str(src), "--dest", str(dest)], capsys)
    line = one_error_line(code, err)
    assert message in line and "b.png" in line, line
    assert not dest.exists()
    with pytest.raises(InputError, match=message.split(";")[0].replace("(", r"\(")):
        open_dataset(str(src), require_labels=True)


def test_labels_out_of_range_in_an_existing_zip_are_refused_when_opened(tmp_path):
    import zipfile

    from edm_deploy.training.dataset import open_dataset, write_dataset_zip

    good = tmp_path / "good.zip"
    write_dataset_zip("digits", str(good), max_images=4)
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "dataset.json":
                meta = json.loads(data)
                meta["labels"][1][1] = 10**9
                data = json.dumps(meta).encode()
            zout.writestr(item, data)
    with pytest.raises(InputError, match="1000000000; class labels must lie in 0..99999"):
        open_dataset(str(bad))


# -- a symlinked output is written through, and locked where it lands ---------------------------

NAMED_OUTPUTS = ["sample --npz", "sample --grid", "dataset --dest", "bench --json", "fid ref (API dest)",
                 "convert --out", "export --out"]


def _write_named_output(kind: str, link: str, tmp_path, capsys) -> None:
    """Run the command that writes the output `kind` to the path `link`."""
    if kind == "fid ref (API dest)":
        from edm_deploy.runtime.fid.fid import make_ref
        from edm_deploy.training.dataset import write_dataset_zip

        data = str(tmp_path / "d.zip")
        write_dataset_zip("digits", data, max_images=4)
        make_ref(data, link, lambda x: x.reshape(len(x), -1)[:, :4].astype(np.float64), progress=False)
        return
    if kind.startswith("sample") or kind == "bench --json":
        if not has_module("onnxruntime"):
            pytest.skip("needs onnxruntime")
        from tests.onnx_oracles import gaussian_onnx

        model = gaussian_onnx(str(tmp_path / "g.onnx"))
        args = {"sample --npz": ["sample", model, "-n", "3", "--steps", "3", "--npz", link],
                "sample --grid": ["sample", model, "-n", "3", "--steps", "3", "--grid", link],
                "bench --json": ["bench", model, "--batch", "2", "--repeats", "1", "--no-sampling", "--json", link]}[kind]
    elif kind == "dataset --dest":
        args = ["dataset", "--source", "digits", "--max-images", "4", "--dest", link]
    else:
        if not has_module("torch"):
            pytest.skip("needs torch")
        if kind == "convert --out":
            from tests.test_convert import _real_pickle  # a small network pickled the reference way

            _, pkl = _real_pickle(tmp_path)
            args = ["convert", pkl, "--out", link]
        else:
            from tests.factories import tiny_checkpoint

            args = ["export", tiny_checkpoint(tmp_path / "c.pt"), "--format", "onnx", "--max-batch", "4", "--out", link]
    code, _, err = run_main(args, capsys)
    assert code == 0, err


@pytest.mark.parametrize("kind", NAMED_OUTPUTS)
def test_a_symlinked_output_is_written_through_and_locked_at_its_target(kind, tmp_path, capsys):
    from edm_deploy.runtime.core.fileio import lock_path_for

    suffix = {"sample --npz": ".npz", "sample --grid": ".png", "dataset --dest": ".zip", "bench --json": ".json",
              "fid ref (API dest)": ".npz", "convert --out": ".pt", "export --out": ".onnx"}[kind]
    store = tmp_path / "store"
    store.mkdir()
    target = store / f"real{suffix}"
    link = tmp_path / f"link{suffix}"
    link.symlink_to(target)
    _write_named_output(kind, str(link), tmp_path, capsys)
    assert link.is_symlink() and os.readlink(link) == str(target), "the link was replaced"
    assert target.is_file() and target.stat().st_size > 0
    assert lock_path_for(str(link)) == lock_path_for(str(target)) == str(store / f".real{suffix}.lock")
    assert not (tmp_path / f".link{suffix}.lock").exists()
    if kind == "sample --npz":
        assert not (tmp_path / "link.npz.parts").exists()
        with np.load(target) as data:
            assert data["images"].shape == (3, 8, 8, 1)
        _write_named_output(kind, str(link), tmp_path, capsys)  # the finished file behind the link: nothing to do


@requires_onnx
def test_a_symlink_planted_inside_an_output_folder_is_replaced_never_written_through(tmp_path, capsys):
    from tests.onnx_oracles import gaussian_onnx

    model = gaussian_onnx(str(tmp_path / "g.onnx"))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".edm-deploy-sample.json").symlink_to(victim)
    code, _, err = run_main(["sample", model, "-n", "2", "--steps", "3", "--outdir", str(out)], capsys)
    assert code == 0, err
    (out / "000001.png").unlink()
    (out / "000001.png").symlink_to(victim)  # counted as an image? it is not one: redone, the link replaced
    code, _, err = run_main(["sample", model, "-n", "2", "--steps", "3", "--outdir", str(out)], capsys)
    assert code == 0, err
    assert victim.read_text() == "precious"
    assert not (out / ".edm-deploy-sample.json").is_symlink() and not (out / "000001.png").is_symlink()


# -- a schedule file spent differently from how it was searched ---------------------------------


def test_a_schedule_spent_with_other_settings_says_how():
    from edm_deploy.runtime.sampling.schedule_file import mismatch_warnings

    meta = {"model_sha256": "a" * 64, "solver": "ipndm", "nfe": 5, "afs": True, "denoise_to_zero": False,
            "max_order": 4}
    assert mismatch_warnings(meta, "a" * 64, "ipndm", afs=True, max_order=4, denoise_to_zero=False, nfe=5) == []
    assert mismatch_warnings(meta, "a" * 64, "ipndm") == []  # arguments not given are not compared
    notes = mismatch_warnings(meta, "b" * 64, "deis", afs=False, max_order=3, denoise_to_zero=True, nfe=6)
    assert len(notes) == 6
    joined = " | ".join(notes)
    for part in ("another model", "deis", "searched with afs", "this run samples without it",
                 "searched without denoise_to_zero; this run samples with it", "max_order 4; this run uses 3",
                 "NFE 5; this run spends 6"):
        assert part in joined, (part, joined)
    assert mismatch_warnings({"solver": "ipndm"}, "a", "ipndm", afs=True, nfe=5) == []  # old files: not recorded


@pytest.mark.skipif(not has_module("onnx"), reason="needs onnx")
def test_a_searched_schedule_file_records_what_the_warnings_compare(tmp_path):
    from edm_deploy.runtime.sampling.schedule_file import read_schedule, write_schedule
    from edm_deploy.runtime.sampling.schedule_search import ScheduleSearch

    search = ScheduleSearch(sigmas=np.array([80.0, 1.0, 0.002]), solver="ipndm", nfe=3, path=[0, 1, 2],
                            fine_sigmas=np.array([80.0, 1.0, 0.002]), cost=0.0, step_costs=[0.0, 0.0],
                            settings={"afs": True, "denoise_to_zero": False, "max_order": 4})
    path = tmp_path / "s.json"
    write_schedule(str(path), search.sigmas, model_sha256="a" * 64, **search.metadata())
    _, meta = read_schedule(str(path))
    assert {k: meta[k] for k in ("solver", "nfe", "afs", "denoise_to_zero", "max_order")} == {
        "solver": "ipndm", "nfe": 3, "afs": True, "denoise_to_zero": False, "max_order": 4}


def test_calibration_seeds_stay_below_2_to_the_32():
    from edm_deploy.export.quantize import check_options

    assert check_options(16, 2**32 - 16, "minmax", 18, 99.99) == "minmax"
    with pytest.raises(InputError, match="needs seeds up to 4294967299") as info:
        check_options(16, 2**32 - 12, "minmax", 18, 99.99)
    assert info.value.param == "seed"
