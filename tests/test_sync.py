"""The sampler reads nothing back from the device per step, only once per draw (window of
``thin`` steps), and a divergence inside a draw's steps is recorded exactly as a chain stopped
at that step: same step, trace, draws and (with a store) checkpointed state.

On a CPU a host-device synchronisation cannot be observed, so the first test counts what
causes one on a GPU: every conversion of a tensor to Python or host memory (``item``,
``float``, ``bool``, ``tolist``, ``cpu``, ...) made while sampling, through a
``TorchFunctionMode`` that sees every tensor call of the real sampler."""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import suscept
from suscept.sample import chain_generators
from suscept.store import DrawStore

READS = {"item", "__float__", "__int__", "__bool__", "__index__", "__format__", "tolist",
         "numpy", "cpu", "__array__"}


class HostReads(TorchFunctionMode):
    """Counts calls that copy a tensor's value to the host (a synchronisation on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in READS
        return func(*args, **(kwargs or {}))


N, M = 240, 4  # training samples, minibatch size: 60 minibatches per epoch


def problem(poison: int | None = None):
    """A small regression MLP; with ``poison``, sample ``poison``'s input is NaN, so the
    minibatch loss is NaN at the first step whose minibatch holds it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, generator=g)
    y = x[:, :1] - 0.5 * x[:, 1:2] + 0.1 * torch.randn(N, 1, generator=g)
    if poison is not None:
        x = x.clone()
        x[poison] = float("nan")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    def loss_fn(module, batch):
        xb, yb = batch
        return ((module(xb) - yb) ** 2).mean(-1)

    probe = (torch.randn(6, 3, generator=g), torch.randn(6, 1, generator=g))
    return model, loss_fn, (x, y), probe


def config(**kw):
    base = dict(step_size=1e-3, n_beta=20.0, gamma=100.0, n_chains=2, n_draws=6, thin=1,
                batch_size=M, seed=3, n_blocks=2)
    return suscept.SamplerConfig(**{**base, **kw})


def host_reads(batched: bool = False, **kw) -> int:
    model, loss_fn, data, probe = problem()
    with HostReads() as reads:
        suscept.sample(model, loss_fn, data, config(**kw), probe=probe, progress=False,
                       observables={"out": lambda m: m(probe[0])[:, 0]}, batched=batched)
    return reads.count


@pytest.mark.parametrize("batched", [False, True])
def test_host_reads_per_draw_do_not_grow_with_thin(batched):
    one = host_reads(batched, thin=1)
    assert host_reads(batched, thin=7) == one  # O(1) per draw, not O(thin)
    # per draw and chain: one read of the draw's summary and one copy per stored observable
    per_draw = (host_reads(batched, thin=1, n_draws=10) - one) / (4 * 2)
    assert per_draw <= 1 + 2 + batched  # (batched: one more read of the steps' losses)
    # burn-in losses are read every 64 steps, not every step
    assert host_reads(batched, thin=1, burn_in=130) - one <= 2 * 3


def first_step_holding(index: int, seed: int, chain: int) -> int:
    """The step whose minibatch first holds sample ``index``: minibatches are consecutive
    slices of ``M`` of one shuffle of the ``N`` samples per epoch (the chain's data generator)."""
    _, gen = chain_generators(seed, chain, torch.device("cpu"))
    for epoch in range(100):
        perm = torch.randperm(N, generator=gen).tolist()
        if index in perm:
            return epoch * (N // M) + perm.index(index) // M
    raise AssertionError("unreachable")


def test_a_divergence_inside_a_draw_is_recorded_at_its_step():
    seed, thin, burn_in = 3, 4, 2
    # a sample first drawn by chain 0 strictly inside a draw's steps, after a few draws
    cfg = config(thin=thin, burn_in=burn_in, n_draws=12, seed=seed)
    poison = next(i for i in range(N) if burn_in + 2 * thin <= first_step_holding(i, seed, 0)
                  < cfg.n_steps and (first_step_holding(i, seed, 0) - burn_in) % thin in (1, 2))
    k = first_step_holding(poison, seed, 0)
    others = first_step_holding(poison, seed, 1)  # chain 1 meets it too, maybe later
    for batched in (False, True):  # against the same sampler on clean data
        clean = sample(cfg, None, batched=batched)
        run = sample(cfg, poison, batched=batched)
        got = sorted((d.chain, d.step) for d in run.divergences)
        assert got == sorted([(0, k), (1, others)][: 2 if others < cfg.n_steps else 1])
        assert all(d.reason.startswith("minibatch loss nan") for d in run.divergences)
        taken = (k - burn_in) // thin  # draws completed before the divergence
        assert torch.equal(run.loss_trace[0, :k], clean.loss_trace[0, :k])
        assert math.isnan(run.loss_trace[0, k]) and run.loss_trace[0, k + 1:].isnan().all()
        assert torch.equal(run.draws["loss"][0, :taken], clean.draws["loss"][0, :taken])
        assert run.draws["loss"][0, taken:].isnan().all()
        assert torch.equal(run.distance[0, :taken], clean.distance[0, :taken])


def sample(cfg, poison, **kw):
    model, loss_fn, data, probe = problem(poison)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", suscept.DivergenceWarning)
        return suscept.sample(model, loss_fn, data, cfg, probe=probe, progress=False, **kw)


def test_a_stopped_chain_checkpoints_the_state_of_its_step(tmp_path):
    """With a store, the checkpoint of a chain that diverged at step k inside a draw holds
    w_k, the preconditioner, the noise generator after k updates and the minibatch position
    after k + 1 minibatches: the state of a chain stopped at once, not at the draw's end."""
    seed, thin = 3, 5
    poison = next(i for i in range(N) if first_step_holding(i, seed, 0) % thin == 2
                  and thin < first_step_holding(i, seed, 0) < 10 * thin)
    k = first_step_holding(poison, seed, 0)
    cfg = config(thin=thin, n_draws=10, seed=seed, n_chains=1, precondition="rmsprop")
    sample(cfg, poison, store=DrawStore(tmp_path / "poisoned"))
    stopped = DrawStore.open(tmp_path / "poisoned").restore(0)
    # the same chain on clean data, k steps of one draw each: its last checkpoint is at w_k
    sample(config(thin=1, n_draws=k, n_blocks=1, seed=seed, n_chains=1, precondition="rmsprop"),
           None, store=DrawStore(tmp_path / "clean"))
    ref = DrawStore.open(tmp_path / "clean").restore(0)
    assert stopped["divergence"]["step"] == k and stopped["done"] and stopped["step"] == k + 1
    assert stopped["sgld_step"] == ref["sgld_step"] == k
    for key in ("params", "sq_avg", "noise"):
        assert torch.equal(stopped[key], ref[key]), key
    assert stopped["pos"] == k % (N // M) * M + M and torch.equal(stopped["trace"][:k],
                                                                  ref["trace"][:k])


def test_an_error_after_a_divergence_in_the_window_is_the_divergence():
    """Steps after a divergence run before the window's losses are read; a loss function that
    raises on the weights they leave (NaN) gives the divergence, not its error; one that
    raises with no divergence before it raises as before."""
    seed, thin = 3, 6
    poison = next(i for i in range(N) if first_step_holding(i, seed, 0) % thin < thin - 2
                  and thin < first_step_holding(i, seed, 0) < 8 * thin)
    k = first_step_holding(poison, seed, 0)
    model, loss_fn, data, probe = problem(poison)

    def strict(module, batch):
        if not all(bool(p.isfinite().all()) for p in module.parameters()):
            raise FloatingPointError("non-finite weights")
        return loss_fn(module, batch)

    cfg = config(thin=thin, n_draws=8, seed=seed, n_chains=1)
    with pytest.warns(suscept.DivergenceWarning, match=f"diverged at step {k} "):
        run = suscept.sample(model, strict, data, cfg, probe=probe, progress=False)
    assert [(d.chain, d.step) for d in run.divergences] == [(0, k)]

    def broken(module, batch):
        if batch[0].shape[0] == M and batch[0].isnan().any():
            raise RuntimeError("broken batch")
        return loss_fn(module, batch)

    with pytest.raises(RuntimeError, match="broken batch"):  # at step k, before its NaN loss
        suscept.sample(model, broken, data, cfg, probe=probe, progress=False)
