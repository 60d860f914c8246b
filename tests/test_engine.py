"""The serving engine (`runtime/serving/`): step-level continuous batching of step programs.

* served images equal `generate` / `sample` for the same seed and settings, whatever else is in
  flight (analytic oracles exactly; a real UNet export under --fixed-batch bit for bit);
* rows of different requests, at different sigmas, share one network call, never above the limit;
* FIFO admission, no starvation, a queue limit, per-request limits, cancellation and timeouts
  that free rows, a failing request that does not take the others down, draining shutdown.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from edm_deploy.runtime.core.contract import DenoiserBase
from edm_deploy.runtime.core.errors import InputError, NumericalError
from edm_deploy.runtime.sampling.fixed_shape import FixedShapeDenoiser
from edm_deploy.runtime.sampling.generate import generate
from edm_deploy.runtime.serving import BusyError, DeadlineError, Engine
from tests.conftest import requires_onnx, requires_torch


class Recording(DenoiserBase):
    """Ideal denoiser of class-conditional Gaussian data (class k: N(mu_k, std^2 I); the zero label: the
    mean of the means), recording the sigmas of every call; it can be slowed or poisoned at one sigma."""

    def __init__(self, label_dim=4, spread=0.5, std=0.4, delay=0.0, poison_sigma=None):
        self.img_channels, self.img_resolution, self.label_dim = 1, 8, label_dim
        self.sigma_min, self.sigma_max = 0.002, 80.0
        self.mus = np.linspace(-spread, spread, label_dim).reshape(-1, 1, 1, 1) + np.zeros((1, 1, 8, 8))
        self.std, self.delay, self.poison_sigma = std, delay, poison_sigma
        self.calls = []

    def __call__(self, x, sigma, class_labels=None):
        sigma = np.asarray(sigma, dtype=np.float64).reshape(-1)
        self.calls.append(sigma.copy())
        if self.delay:
            time.sleep(self.delay)
        labels = np.asarray(class_labels, dtype=np.float64)
        mu = np.tensordot(labels, self.mus, axes=1)
        s2 = np.square(sigma)[:, None, None, None]
        var = self.std**2
        out = mu + (var / (var + s2)) * (np.asarray(x, dtype=np.float64) - mu)
        if self.poison_sigma is not None:
            out = np.where((np.abs(sigma - self.poison_sigma) < 1e-9)[:, None, None, None], np.nan, out)
        return out


class FailsFirstCall(Recording):
    """A Recording whose first call raises `message` (a kernel failing once), the later ones answer."""

    def __init__(self, message="a kernel failed", **kwargs):
        super().__init__(**kwargs)
        self.message = message

    def __call__(self, x, sigma, class_labels=None):
        if not self.calls:
            self.calls.append(None)
            raise RuntimeError(self.message)
        return super().__call__(x, sigma, class_labels)


def conditional(**kwargs):
    return Recording(**kwargs)


MIX = [
    dict(seeds=[0, 1, 2], settings={"solver": "ipndm", "nfe": 5}),
    dict(seeds=[3], settings={}),                                              # heun, NFE 35
    dict(seeds=[4, 5], class_idx=2, settings={"solver": "unipc", "nfe": 6, "afs": True}),
    dict(seeds=[6, 7], class_idx=[1, 3], settings={"solver": "euler", "num_steps": 9, "S_churn": 20}),
    dict(seeds=[8], settings={"solver": "dpmpp-2m", "sigmas": [80.0, 10.0, 1.0, 0.1, 0.002]}),
    dict(seeds=[9, 10], settings={"solver": "deis", "nfe": 4}, guidance=1.5),
    dict(seeds=[11], settings={"solver": "heun", "num_steps": 6, "discretization": "vp"}),
]


def _offline(den, job):
    return generate(den, job["seeds"], class_idx=job.get("class_idx"), guidance=job.get("guidance"),
                    **job["settings"])


def test_served_images_equal_offline_images_under_mixed_concurrent_load():
    den = conditional()
    den.label_dropout = 0.1
    with Engine(den, max_batch=8) as engine:
        with engine._lock:  # the loop waits for this lock: every request is queued before its first tick
            futures = [engine.submit(job["seeds"], job.get("class_idx"), job["settings"], guidance=job.get("guidance"))
                       for job in MIX]
        results = [f.result(timeout=60) for f in futures]
    for job, result in zip(MIX, results):
        np.testing.assert_array_equal(result.images, _offline(den, job))
        assert result.seeds == job["seeds"]
    assert engine.stats.requests_done == len(MIX) and engine.stats.requests_failed == 0
    # rows of several requests at different noise levels shared calls, never above the limit
    assert max(len(c) for c in den.calls) <= 8
    assert any(len(np.unique(c)) > 1 for c in den.calls)
    assert engine.stats.rows_per_call > 3, [len(c) for c in den.calls]


def test_an_image_does_not_depend_on_what_else_is_in_flight():
    den = conditional()
    alone = Engine(den, max_batch=16)
    with alone:
        want = alone.submit([5], 1, {"solver": "ipndm", "nfe": 5}).result(timeout=30).images
    with Engine(den, max_batch=16) as busy:
        noise = [busy.submit(list(range(100 + 3 * k, 103 + 3 * k)), None, {"solver": "heun", "num_steps": 4 + k})
                 for k in range(4)]
        got = busy.submit([5], 1, {"solver": "ipndm", "nfe": 5}).result(timeout=30).images
        [f.result(timeout=30) for f in noise]
    np.testing.assert_array_equal(got, want)


def test_bad_requests_get_the_messages_the_api_gives():
    den = conditional()
    engine = Engine(den, max_batch=8, max_images=4)
    cases = [
        (dict(seeds=[0], settings={"solver": "heun", "afs": True}), "afs does not apply to the heun solver"),
        (dict(seeds=[0], settings={"solver": "ipndm", "nfe": 5, "steps": 3}), "unknown sampler option 'steps'"),
        (dict(seeds=[2**32]), "seeds lie in 0..4294967295"),
        (dict(seeds=[1.9]), "must be an integer seed"),
        (dict(seeds="01"), "must be a list of integer seeds"),
        (dict(seeds=[0, 1], class_idx=[0]), "one per seed"),
        (dict(seeds=[0], class_idx="3"), "class_idx must be an integer"),
        (dict(seeds=[0], class_idx=7), "out of range"),
        (dict(seeds=list(range(5))), "at most 4 images"),
        (dict(seeds=[0], settings={"solver": "heun", "nfe": 10}), "nearest possible: 9 or 11"),
        (dict(seeds=[0], timeout=-1), "timeout must be a positive"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InputError, match=match):
            engine.submit(**kwargs)
        if "steps" in str(kwargs) or "afs" in str(kwargs):
            with pytest.raises(InputError, match=match):
                generate(den, kwargs["seeds"], **kwargs["settings"])
    engine.shutdown()


def test_requests_beyond_the_queue_limit_are_refused_at_once_with_a_retry_hint():
    den = conditional(delay=0.02)
    with Engine(den, max_batch=1, max_queue=2) as engine:
        first = engine.submit([0], settings={"solver": "heun", "num_steps": 8})
        time.sleep(0.1)  # the first is in flight
        queued = [engine.submit([k], settings={"solver": "euler", "num_steps": 2}) for k in (1, 2)]
        with pytest.raises(BusyError, match="queue is full") as info:
            engine.submit([3])
        assert not queued[-1].done() and info.value.retry_after > 0  # refused while the queue was full
        for f in [first, *queued]:
            f.result(timeout=30)


def test_cancelled_and_timed_out_requests_free_their_rows():
    den = conditional(delay=0.01)
    with Engine(den, max_batch=8) as engine:
        long = engine.submit([0, 1, 2, 3], settings={"solver": "heun", "num_steps": 60})
        short = engine.submit([4], settings={"solver": "heun", "num_steps": 40}, timeout=0.15)
        time.sleep(0.1)
        long.cancel()
        with pytest.raises(DeadlineError, match="timeout"):
            short.result(timeout=30)
        calls_before = len(den.calls)
        after = engine.submit([9], settings={"solver": "euler", "num_steps": 3}).result(timeout=30)
    assert long.cancelled()
    with pytest.raises(CancelledError):
        long.result()
    # once both are gone, the calls carry the newcomer's row alone
    assert all(len(c) == 1 for c in den.calls[calls_before + 1:])
    assert after.nfe == 3 and engine.stats.requests_cancelled == 1


def test_admission_is_fifo_and_a_long_request_is_not_starved():
    den = conditional()
    with Engine(den, max_batch=4) as engine:
        long = engine.submit([0, 1, 2], settings={"solver": "heun", "num_steps": 30})  # 59 calls, 3 rows
        stream = []
        for k in range(30):
            stream.append(engine.submit([10 + k], settings={"solver": "ipndm", "nfe": 3}))
        done_long = long.result(timeout=60)
        shorts = [f.result(timeout=60) for f in stream]
    assert done_long.nfe == 59
    # a single row stays free beside the long request, so the shorts run one at a time in order
    starts = [r.admitted_at for r in shorts]
    assert starts == sorted(starts) and all(r.admitted_at > done_long.admitted_at for r in shorts)


def test_a_request_is_counted_before_its_answer_reaches_the_client():
    """What a client sees the moment its future resolves already includes its own request."""
    with Engine(conditional(), max_batch=8) as engine:
        seen = []
        ok = engine.submit([0], None, {"solver": "euler", "num_steps": 3})
        ok.add_done_callback(lambda f: seen.append((engine.stats.requests_done, engine.stats.images_done)))
        ok.result(timeout=30)
    assert seen == [(1, 1)]


def test_a_failing_request_does_not_take_the_others_down():
    den = conditional(poison_sigma=1.5)
    with Engine(den, max_batch=8) as engine:
        bad = engine.submit([0], settings={"solver": "dpmpp-2m", "sigmas": [80.0, 1.5, 0.002]})
        good = engine.submit([1], settings={"solver": "dpmpp-2m", "sigmas": [80.0, 2.5, 0.002]})
        with pytest.raises(NumericalError, match="NaN/Inf for seeds 0"):
            bad.result(timeout=30)
        assert good.result(timeout=30).images.shape == (1, 8, 8, 1)


def test_shutdown_drains_in_flight_requests_and_refuses_new_ones():
    den = conditional(delay=0.005)
    engine = Engine(den, max_batch=4).start()
    futures = [engine.submit([k], settings={"solver": "heun", "num_steps": 10}) for k in range(6)]
    closer = threading.Thread(target=engine.shutdown)
    closer.start()
    time.sleep(0.02)
    with pytest.raises(BusyError, match="shutting down"):
        engine.submit([99])
    closer.join(timeout=60)
    assert all(f.done() and not f.cancelled() and f.exception() is None for f in futures)


def test_fixed_batch_makes_every_call_exactly_that_many_rows():
    den = conditional()
    with Engine(den, fixed_batch=4) as engine:
        futures = [engine.submit([k, k + 10], settings={"solver": "ipndm", "nfe": 4}) for k in range(3)]
        results = [f.result(timeout=30) for f in futures]
    assert {len(c) for c in den.calls} == {4}
    for k, r in enumerate(results):
        np.testing.assert_array_equal(r.images, generate(den, [k, k + 10], solver="ipndm", nfe=4))


def test_autoguidance_rows_go_to_the_guide_in_one_call():
    den, guide = conditional(), Recording(spread=0.4, std=0.45)
    job = dict(seeds=[0, 1], settings={"solver": "ipndm", "nfe": 5})
    with Engine(den, guide, max_batch=8) as engine:
        served = engine.submit(job["seeds"], 2, job["settings"], guidance=2.0, guidance_interval=(0.5, 10.0))
        plain = engine.submit([5], 2, job["settings"])
        served, plain = served.result(timeout=30), plain.result(timeout=30)
    want = generate(den, job["seeds"], 2, guide=guide, guidance=2.0, guidance_interval=(0.5, 10.0), **job["settings"])
    np.testing.assert_array_equal(served.images, want)
    np.testing.assert_array_equal(plain.images, generate(den, [5], 2, **job["settings"]))
    assert engine.stats.guide_calls > 0


def test_the_asyncio_form_awaits_the_same_result():
    import asyncio

    den = conditional()

    async def main():
        with Engine(den, max_batch=8) as engine:
            results = await asyncio.gather(*[engine.generate([k], settings={"solver": "ipndm", "nfe": 5})
                                             for k in range(5)])
        return results

    results = asyncio.run(main())
    for k, r in enumerate(results):
        np.testing.assert_array_equal(r.images, generate(den, [k], solver="ipndm", nfe=5))


@requires_torch
@requires_onnx
def test_served_unet_images_equal_sample_fixed_batch_bit_for_bit(tmp_path):
    """A real (tiny, random-weight) UNet through onnxruntime: kernels may depend on the batch shape,
    so the guarantee is under fixed_batch, as `sample --fixed-batch` gives it."""
    from edm_deploy.export.onnx_export import export_onnx
    from edm_deploy.loading import load
    from edm_deploy.runtime.sampling.fixed_shape import FixedShapeDenoiser
    from tests.factories import tiny_network

    net, network = tiny_network("ddpmpp", label_dim=10)
    path = str(tmp_path / "m.onnx")
    export_onnx(net, network, path, max_batch=16)
    jobs = [([0, 1, 2], 3, {"solver": "ipndm", "nfe": 5}), ([3], None, {"solver": "heun", "num_steps": 4}),
            ([4, 5], [1, 7], {"solver": "unipc", "nfe": 4}), ([6], 9, {"solver": "dpmpp-3m", "nfe": 6})]
    with load(path) as den:
        with Engine(den, fixed_batch=8) as engine:
            futures = [engine.submit(seeds, cls, settings) for seeds, cls, settings in jobs]
            results = [f.result(timeout=120) for f in futures]
        offline = FixedShapeDenoiser(den, 8)
        for (seeds, cls, settings), result in zip(jobs, results):
            np.testing.assert_array_equal(result.images, generate(offline, seeds, cls, batch_size=3, **settings))


def _engine_paused(den, **kwargs):
    """An engine whose loop has not started, so requests submitted now are admitted together."""
    engine = Engine(den, **kwargs)
    engine._thread = threading.current_thread()  # submit() starts no loop; run it with engine._loop
    return engine


def test_requests_with_one_plan_share_a_program_and_keep_their_own_images():
    den = conditional()
    engine = _engine_paused(den, max_batch=16)
    jobs = [([0, 1], None), ([2], 3), ([3, 4], (1, 2)), ([5], None)]
    futures = [engine.submit(seeds, cls, {"solver": "ipndm", "nfe": 5}) for seeds, cls in jobs]
    engine._stopping = True
    engine._loop()
    assert engine.stats.network_calls == 5  # one program for all four: one call per evaluation
    for (seeds, cls), f in zip(jobs, futures):
        want = generate(den, seeds, class_idx=list(cls) if isinstance(cls, tuple) else cls, solver="ipndm", nfe=5)
        np.testing.assert_array_equal(f.result().images, want)


class CancelsAtCall(Recording):
    """Cancels ``future`` right after its ``at``-th call, as a client that goes away mid-program."""

    def __init__(self, at, **kwargs):
        super().__init__(**kwargs)
        self.at, self.future = at, None

    def __call__(self, x, sigma, class_labels=None):
        out = super().__call__(x, sigma, class_labels)
        if len(self.calls) == self.at:
            self.future.cancel()
        return out


def test_a_member_that_leaves_a_shared_program_frees_its_rows():
    den = CancelsAtCall(at=2)
    engine = _engine_paused(den, max_batch=16)
    stay = engine.submit([0, 1], None, {"solver": "heun", "num_steps": 6})
    den.future = leave = engine.submit([2, 3, 4], None, {"solver": "heun", "num_steps": 6})
    engine._stopping = True
    engine._loop()
    rows = [len(s) for s in den.calls]
    assert rows[:2] == [5, 5] and set(rows[2:]) == {2}  # the cancel is seen before the next call
    assert len(rows) == 11 and leave.cancelled()
    np.testing.assert_array_equal(stay.result().images, generate(Recording(), [0, 1], solver="heun", num_steps=6))


class TorchRecording(Recording):
    """The same oracle on torch tensors (as the torch backend and device-resident state give them)."""

    def to_device(self, x):
        import torch

        return torch.from_numpy(np.ascontiguousarray(x))

    def __call__(self, x, sigma, class_labels=None):
        import torch

        return torch.from_numpy(super().__call__(x.numpy(), sigma, class_labels))


@requires_torch
def test_a_member_leaving_a_shared_program_on_torch_tensors():
    class Leaves(TorchRecording):
        def __call__(self, x, sigma, class_labels=None):
            out = super().__call__(x, sigma, class_labels)
            if len(self.calls) == 2:
                self.future.cancel()
            return out

    den = Leaves()
    engine = _engine_paused(den, max_batch=16)
    stay = engine.submit([0, 1], None, {"solver": "ipndm", "nfe": 4})
    den.future = engine.submit([2, 3, 4], None, {"solver": "ipndm", "nfe": 4})
    engine._stopping = True
    engine._loop()
    assert [len(s) for s in den.calls] == [5, 5, 2, 2]
    np.testing.assert_array_equal(stay.result().images, generate(Recording(), [0, 1], solver="ipndm", nfe=4))


def test_a_cancel_that_races_the_last_call_is_final_and_the_loop_does_not_spin():
    engine = _engine_paused(conditional(), max_batch=4)
    future = engine.submit([0], 1, {"solver": "euler", "num_steps": 2}, timeout=0.05)
    entry = engine._waiting[0].request
    future.cancel()  # the client leaves while its last call runs; then the engine tries to resolve it
    assert engine._settle(entry, "images", "ok") is False
    assert entry.settled and entry not in engine._deadlines and engine.stats.requests_cancelled == 1
    time.sleep(0.1)  # past its deadline: a request still counted as live would make the loop wait 0 s forever
    engine._stopping = True
    done = threading.Thread(target=engine._loop, daemon=True)
    done.start()
    done.join(timeout=10)
    assert not done.is_alive() and engine.stats.requests_cancelled == 1 and engine.stats.requests_failed == 0


class FailsToStart(Recording):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.starts = 0

    def to_device(self, x):
        self.starts += 1
        if self.starts == 1:
            raise MemoryError("out of device memory (a planted failure)")
        return x


@pytest.mark.parametrize("scheduler", ["continuous", "request-batch", "one-request"])
def test_a_program_that_fails_to_start_fails_its_request_only(scheduler):
    with Engine(FailsToStart(), max_batch=8, scheduler=scheduler) as engine:
        first = engine.submit([0], 1, {"solver": "ipndm", "nfe": 3})
        with pytest.raises(MemoryError, match="planted"):
            first.result(timeout=10)
        second = engine.submit([1], 1, {"solver": "ipndm", "nfe": 3})
        assert second.result(timeout=10).images.shape == (1, 8, 8, 1)  # the engine still admits and runs


def test_guidance_that_cannot_fit_the_batch_limit_is_refused_not_queued():
    engine = Engine(conditional(), max_batch=1)
    with pytest.raises(InputError, match="2 rows per image, more than this engine's batch limit of 1"):
        engine.submit([0], 1, {"solver": "euler", "num_steps": 2}, guidance=2.0)
    assert engine.queue_length == 0


def test_shutdown_without_drain_cancels_every_member_of_a_shared_program():
    engine = _engine_paused(conditional(delay=0.02), max_batch=16)
    futures = [engine.submit([k], 1, {"solver": "heun", "num_steps": 30}) for k in range(3)]
    engine._thread = None
    engine.start()
    time.sleep(0.1)  # admitted together: one program for all three
    engine.shutdown(drain=False, timeout=10)
    assert not engine._thread.is_alive()
    assert all(f.cancelled() for f in futures) and engine.stats.requests_cancelled == 3


# ----- the scheduler registry


def test_serve_offers_the_schedulers_of_the_registry():
    from edm_deploy.commands.serve import serve
    from edm_deploy.runtime.serving import SCHEDULERS

    option = next(p for p in serve.params if p.name == "scheduler")
    assert list(option.type.choices) == list(SCHEDULERS) and "deadline" in SCHEDULERS


# ----- determinism: batch shapes checked at start-up, padding only where a row's result changes


class ShapeDependent(Recording):
    """Rows come out shifted unless the call has a multiple of 4 rows, as a kernel chosen by shape would."""

    def __call__(self, x, sigma, class_labels=None):
        out = super().__call__(x, sigma, class_labels)
        return out if len(out) % 4 == 0 else out + 0.05


def test_a_batch_invariant_model_is_called_unpadded_and_the_engine_says_so():
    den = conditional()
    engine = Engine(den, max_batch=8)
    assert str(engine.determinism).startswith("pending") and str(engine.check_shapes()) == str(engine.determinism)
    probes = len(den.calls)
    with engine:
        [f.result(timeout=30) for f in [engine.submit([k], 1, {"solver": "ipndm", "nfe": 3}) for k in range(3)]]
    assert engine.determinism.kind == "batch-invariant" and not engine.determinism.pads
    assert str(engine.determinism) == "batch-invariant (checked at batch sizes 1-8)"
    assert probes == 9  # every size 1..8 once, and the full batch twice
    assert engine.stats.padded_rows == 0 and engine.stats.rows == sum(len(c) for c in den.calls[probes:])


def test_rows_that_depend_on_the_batch_shape_are_padded_to_the_shapes_that_match_the_full_batch():
    den = ShapeDependent()
    jobs = [([0, 1, 2], 3, {"solver": "ipndm", "nfe": 5}), ([3], None, {"solver": "heun", "num_steps": 4}),
            ([4, 5], (1, 2), {"solver": "euler", "num_steps": 5})]
    engine = Engine(den, max_batch=8)
    engine.check_shapes()
    probes = len(den.calls)
    with engine:
        results = [f.result(timeout=30) for f in [engine.submit(*job) for job in jobs]]
    assert engine.determinism.kind == "padded" and engine.determinism.shapes == (4, 8)
    assert "padded to batch sizes 4, 8" in str(engine.determinism)
    served = [len(c) for c in den.calls[probes:]]
    assert set(served) <= {4, 8}
    assert engine.stats.rows + engine.stats.padded_rows == sum(served) and engine.stats.padded_rows > 0
    reference = FixedShapeDenoiser(den, 8)  # every row as it comes out of a call of the full batch
    for (seeds, cls, settings), result in zip(jobs, results):
        want = generate(reference, seeds, list(cls) if isinstance(cls, tuple) else cls, **settings)
        np.testing.assert_array_equal(result.images, want)
        assert not np.array_equal(result.images, generate(den, seeds, list(cls) if isinstance(cls, tuple) else cls,
                                                          batch_size=1, **settings))


def test_a_network_that_differs_between_identical_calls_gets_no_guarantee():
    class Noisy(Recording):
        def __call__(self, x, sigma, class_labels=None):
            return super().__call__(x, sigma, class_labels) + np.random.default_rng().normal(0, 1e-6)

    engine = Engine(Noisy(), max_batch=4)
    engine.check_shapes()
    assert engine.determinism.kind == "nondeterministic" and "identical calls of the network differ" in str(engine.determinism)


def test_fixed_batch_counts_its_padding_apart_from_the_real_rows():
    den = conditional()
    with Engine(den, fixed_batch=4) as engine:
        engine.submit([0], 1, {"solver": "euler", "num_steps": 3}).result(timeout=30)
    assert str(engine.determinism) == "fixed batch 4"
    assert (engine.stats.rows, engine.stats.padded_rows, engine.stats.network_calls) == (3, 9, 3)


def conv_onnx(path: str, label_dim: int = 10, width: int = 16, max_batch: int = 8) -> str:
    """A small convolutional denoiser graph with random weights, D = c_skip x + c_out F(c_in x, labels):
    real onnxruntime convolution kernels, built without torch."""
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edm_deploy.runtime.core.manifest import ONNX_METADATA_KEY
    from tests.onnx_oracles import oracle_manifest

    rng = np.random.default_rng(0)
    const = {"w1": rng.normal(0, 0.3, (width, 1, 3, 3)), "w2": rng.normal(0, 0.1, (1, width, 3, 3)),
             "emb": rng.normal(0, 0.5, (label_dim, width)), "one": 1.0, "four": [-1, 1, 1, 1],
             "four_c": [-1, width, 1, 1]}
    inits = [numpy_helper.from_array(np.asarray(v, np.int64 if k.startswith("four") else np.float32), k)
             for k, v in const.items()]
    nodes = [
        helper.make_node("Reshape", ["sigma", "four"], ["s"]), helper.make_node("Mul", ["s", "s"], ["s2"]),
        helper.make_node("Add", ["s2", "one"], ["v"]), helper.make_node("Div", ["one", "v"], ["c_skip"]),
        helper.make_node("Sqrt", ["v"], ["r"]), helper.make_node("Div", ["s", "r"], ["c_out"]),
        helper.make_node("Div", ["x", "r"], ["x_in"]),
        helper.make_node("Conv", ["x_in", "w1"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("MatMul", ["class_labels", "emb"], ["e"]), helper.make_node("Reshape", ["e", "four_c"], ["e4"]),
        helper.make_node("Add", ["h1", "e4"], ["h2"]), helper.make_node("Tanh", ["h2"], ["h3"]),
        helper.make_node("Conv", ["h3", "w2"], ["f"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c_skip", "x"], ["a"]), helper.make_node("Mul", ["c_out", "f"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["denoised"]),
    ]
    image = ["batch", 1, 8, 8]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, image),
              helper.make_tensor_value_info("sigma", TensorProto.FLOAT, ["batch"]),
              helper.make_tensor_value_info("class_labels", TensorProto.FLOAT, ["batch", label_dim])]
    graph = helper.make_graph(nodes, "conv_denoiser", inputs,
                              [helper.make_tensor_value_info("denoised", TensorProto.FLOAT, image)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    manifest = oracle_manifest(1, 8, label_dim, max_batch)
    manifest.update(sigma_min=0.002, sigma_max=80.0, sigma_data=1.0)
    helper.set_model_props(model, {ONNX_METADATA_KEY: json.dumps(manifest)})
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@requires_onnx
def test_a_served_image_equals_sample_at_the_full_batch_on_real_kernels_without_fixing_the_batch(tmp_path):
    """Convolutions through onnxruntime: whatever the start-up check finds on this machine's kernels, a
    row is evaluated only at batch sizes that match a call of the full limit: served = `sample --fixed-batch 8`."""
    from edm_deploy.loading import load

    jobs = [([0, 1, 2], 3, {"solver": "ipndm", "nfe": 4}), ([3], None, {"solver": "euler", "num_steps": 3}),
            ([4, 5], (1, 7), {"solver": "dpmpp-2m", "nfe": 4})]
    with load(conv_onnx(str(tmp_path / "m.onnx"))) as den:
        with Engine(den, max_batch=8) as engine:
            results = [f.result(timeout=120) for f in [engine.submit(*job) for job in jobs]]
        assert engine.determinism.kind in ("batch-invariant", "padded"), engine.determinism
        for (seeds, cls, settings), result in zip(jobs, results):
            want = generate(FixedShapeDenoiser(den, 8), seeds, list(cls) if isinstance(cls, tuple) else cls, **settings)
            np.testing.assert_array_equal(result.images, want)
            assert len(np.unique(result.images)) > 2  # real images, not a constant


# ----- admission by deadline: short work first, priorities, explicit deadlines, and no starvation


def _waiting(entries, first=0):
    """Scheduler-level queue: one single-row chunk per (submitted, nfe, priority, deadline), its seed its number."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from edm_deploy.runtime.serving.requests import Chunk, ImageRequest, RequestState

    chunks = []
    for seq, (submitted, nfe, priority, deadline) in enumerate(entries, start=first):
        spec = ImageRequest((seq,), priority=priority, deadline=deadline)
        state = RequestState(spec, SimpleNamespace(nfe=nfe), Future(), classifier_free=False, autoguided=False)
        state.submitted = submitted
        chunks.append(Chunk(state, slice(0, 1), [seq], None, seq))
    return chunks


def _admit(scheduler, waiting, free, now=0.0, call=0.01):
    import collections

    from edm_deploy.runtime.serving.scheduler import SchedulerState

    queue = collections.deque(waiting)
    taken = scheduler.admit(queue, [], free, SchedulerState(now, call))
    return [c.members[0].seeds[0] for c in taken], queue


def test_the_deadline_policy_admits_short_work_first_then_priority_and_explicit_deadlines():
    from edm_deploy.runtime.serving import DeadlineScheduler

    policy = DeadlineScheduler()
    # a Heun-35 request, then an iPNDM-5 one 0.1 s later: the short one goes first (FIFO would not)
    assert _admit(policy, _waiting([(0.0, 35, 0, None), (0.1, 5, 0, None)]), free=1)[0] == [1]
    # ...unless the long one has waited longer than (stretch - 1) x the difference in work
    assert _admit(policy, _waiting([(0.0, 35, 0, None), (0.4, 5, 0, None)]), free=1)[0] == [0]
    # equal work: a higher priority first, and FIFO among equals
    assert _admit(policy, _waiting([(0.0, 5, 0, None), (0.01, 5, 2, None), (0.02, 5, 0, None)]), free=3)[0] == [1, 0, 2]
    # an explicit tight deadline goes before earlier requests without one
    assert _admit(policy, _waiting([(0.0, 5, 0, None), (0.05, 5, 0, 0.02)]), free=1)[0] == [1]
    # strict order: a first pick that does not fit is not overtaken by one that would
    chunks = _waiting([(0.0, 5, 0, None), (0.2, 5, 0, None)])
    chunks[0].members[0].seeds = [0, 0]  # two rows
    taken, queue = _admit(policy, chunks, free=1)
    assert taken == [] and len(queue) == 2


def test_the_deadline_policy_starves_no_request_under_a_stream_of_short_ones():
    from edm_deploy.runtime.serving import DeadlineScheduler

    policy, call = DeadlineScheduler(), 0.01
    waiting = _waiting([(0.0, 35, 0, None)])   # one long request, then one short request per call, one row free per call
    admitted_at = None
    for tick in range(1, 200):
        waiting += _waiting([(tick * call, 5, 0, None)], first=tick)
        taken, queue = _admit(policy, waiting, free=1, now=tick * call, call=call)
        waiting = list(queue)
        if 0 in taken:
            admitted_at = tick
            break
    # its key is arrival + (stretch - 1) x 35 calls: shorts arriving after 35 - 5 = 30 calls sort behind it
    assert admitted_at is not None and admitted_at <= 32


def test_the_deadline_scheduler_serves_the_same_images():
    den = conditional()
    den.label_dropout = 0.1
    with Engine(den, max_batch=4, scheduler="deadline") as engine:
        futures = [engine.submit(job["seeds"], job.get("class_idx"), job["settings"], guidance=job.get("guidance"),
                                 priority=k % 3, deadline=None if k % 2 else 5.0) for k, job in enumerate(MIX)]
        results = [f.result(timeout=60) for f in futures]
    for job, result in zip(MIX, results):
        np.testing.assert_array_equal(result.images, _offline(den, job))


def test_priority_deadline_and_previews_are_checked():
    engine = Engine(conditional(), max_batch=4)
    for kwargs, match in [(dict(priority=11), "priority must be an integer from -10 to 10"),
                          (dict(priority=1.5), "priority must be an integer"),
                          (dict(deadline=0), "deadline must be a positive number of seconds"),
                          (dict(preview_every=0), "preview_every must be a positive integer"),
                          (dict(preview_every=2), "preview_every and on_preview go together")]:
        with pytest.raises(InputError, match=match):
            engine.submit([0], 1, {"solver": "euler", "num_steps": 3}, **kwargs)
    assert engine.queue_length == 0


# ----- previews, and a consumer that goes away


def test_previews_carry_the_solver_steps_denoised_estimate_as_offline():
    from edm_deploy.runtime.sampling.generate import sample_batch

    den = conditional()
    got = []
    with Engine(den, max_batch=8) as engine:
        future = engine.submit([3, 4], 2, {"solver": "heun", "num_steps": 6}, preview_every=2, on_preview=got.append)
        other = engine.submit([5], 1, {"solver": "heun", "num_steps": 6})  # shares the program, asked for none
        result, _ = future.result(timeout=30), other.result(timeout=30)
    offline = {}
    sample_batch(den, [3, 4], 2, {"solver": "heun", "num_steps": 6},
                 callback=lambda info: offline.setdefault(info.i + 1, np.asarray(info.denoised, np.float32)))
    assert [(p.step, p.steps, p.seeds, p.index) for p in got] == [(s, 6, (3, 4), slice(0, 2)) for s in (2, 4, 6)]
    for p in got:
        np.testing.assert_array_equal(p.denoised, offline[p.step])
    assert result.images.shape == (2, 8, 8, 1)


def _calls_after_preview(on_preview):
    """Rows per network call when a request's preview consumer does `on_preview(future)` at its first preview."""
    den = Recording()
    engine = _engine_paused(den, max_batch=16)
    stay = engine.submit([0, 1], None, {"solver": "euler", "num_steps": 6})
    box = {}
    box["future"] = leave = engine.submit([2, 3, 4], None, {"solver": "euler", "num_steps": 6}, preview_every=2,
                                          on_preview=lambda p: on_preview(box["future"]))
    engine._stopping = True
    engine._loop()
    np.testing.assert_array_equal(stay.result().images, generate(Recording(), [0, 1], solver="euler", num_steps=6))
    return [len(c) for c in den.calls], leave, engine


def test_a_streaming_client_that_goes_away_frees_its_rows_at_the_next_call():
    rows, leave, engine = _calls_after_preview(lambda future: future.cancel())
    assert rows == [5, 5, 2, 2, 2, 2]  # its first preview follows step 2; the next call is without its rows
    assert leave.cancelled() and engine.stats.requests_cancelled == 1


def test_a_preview_consumer_that_fails_ends_its_request_and_frees_its_rows():
    def closed(future):
        raise RuntimeError("the event loop is closed")

    rows, leave, engine = _calls_after_preview(closed)
    assert rows == [5, 5, 2, 2, 2, 2]
    with pytest.raises(RuntimeError, match="event loop is closed"):
        leave.result()
    assert engine.stats.requests_failed == 1


def test_the_shapes_are_checked_with_the_first_call_and_a_network_failing_then_fails_only_that_call():
    den = FailsFirstCall("a kernel failed")
    with Engine(den, max_batch=4) as engine:
        assert engine.determinism.kind == "pending" and den.calls == []  # start() itself calls nothing
        with pytest.raises(RuntimeError, match="a kernel failed"):
            engine.submit([0], 1, {"solver": "euler", "num_steps": 3}).result(timeout=30)
        assert engine.submit([1], 1, {"solver": "euler", "num_steps": 3}).result(timeout=30).nfe == 3
    assert engine.determinism.kind == "batch-invariant"
