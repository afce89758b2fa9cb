"""Cost at GPT-2-small size: SGLD step vs bare SGD step, one draw of the evaluation plan over
all 144 heads + 12 MLPs, the projected 4 x 200-draw run, and devinterp 2.0.1's one-run-per-
component sweep on the same model.

Model: GPT-2 small's architecture (12 layers x 12 heads, d_model 768, d_mlp 3072, vocab
50257, n_ctx 1024; 85M non-embedding parameters; TransformerLens keeps ``W_E`` and ``W_U``
apart, 163M in all) with random weights from a ``HookedTransformerConfig`` (a
``TransformerBridgeConfig`` on TransformerLens 4.x). Probe 16 x 128 tokens, minibatch 8 x 128,
random token ids (costs do not depend on the weights or the text).

Measured (interleaved, same process, ``os.getloadavg()`` printed beside them):

- ``sgd``: forward + backward + ``p -= lr * grad`` on one 8 x 128 minibatch.
- ``sgld``: per step of ``suscept.sample`` (``thin`` steps between two draws of a trivial
  observable; the difference of two runs of ``--steps + 1`` and 1 steps, so model copy and
  anchor evaluation cancel).
- ``plan draw``: one call of the evaluation plan of ``observables.one_run`` (``phi [156]``,
  restricted token losses ``[156, 16 * 127]``, the full model's mean loss). With ``--full`` it is
  the whole plan (use it on a GPU). Without (CPU), it is projected from plans of single
  components at the first and last layer: ``T(full model only) + sum over layers l of
  12 c_head(l) + c_mlp(l)``, with ``c(l) = T(plan of one component at l) - T(full only)``
  interpolated linearly in l; this counts layer l's ``z`` computation once per head, so it errs
  high. Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the peak resident set
  size during the call above the one before it (sampled every 5 ms). On CPU all times are CPU
  seconds (see ``Clock``).
- devinterp 2.0.1 (``--devinterp``): one step of a masked SGMCMC-SGLD run for ``L0H0`` (its
  ``create_param_masks``; frozen parameters get no gradient, as in its sampler); its sweep is
  one such run per component plus one unrestricted run, each evaluating the probe with one full
  forward per draw.

Projected run: 4 chains x 200 draws, one step per draw:
``suscept = 800 (sgld + plan draw)``; ``devinterp = 157 * 800 (its step + probe forward)``.

Host-device synchronizations: nothing per step of ``suscept.sample`` forces one. The steps'
losses stay on the device and are read, with the draw's finiteness flags, probe loss and
``||w - w*||``, in one transfer per draw (``suscept/window.py``); minibatch indices are sliced
from a shuffle sent to the device once per epoch without blocking. So ``sgld`` (one draw after
``--steps + 1`` steps) times the steps as the GPU runs them, with one read at the end.

    .venv/bin/python experiments/benchmarks/gpt2_small.py [--device cuda] [--full] \
        [--devinterp] [--steps 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import observables  # noqa: E402
import suscept  # noqa: E402
from observables.runs import susceptibility_observables  # noqa: E402

GPT2 = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257,
            n_ctx=1024, act_fn="gelu_new", normalization_type="LN", seed=0)
PROBE, BATCH, SEQ = 16, 8, 128
CHAINS, DRAWS = 4, 200


def gpt2_small(device: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if observables.backend() == "hooked":
            from transformer_lens import HookedTransformer, HookedTransformerConfig

            return HookedTransformer(HookedTransformerConfig(**GPT2, device=device)).eval()
        from transformer_lens import TransformerBridge, TransformerBridgeConfig

        torch.manual_seed(0)
        cfg = {k: v for k, v in GPT2.items() if k != "seed"}
        return TransformerBridge.boot_native(TransformerBridgeConfig(**cfg)).to(device).eval()


class Clock:
    """Time of a block (synchronizing a GPU) and its peak memory above the start.

    On CPU the time is CPU time: at ``--threads 1`` this thread's (``time.thread_time``; torch
    computes in the calling thread, the memory watcher is left out), else the process's. It is
    blind to the time other processes take from a shared machine. On GPU it is wall time.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.wall = 0.0  # wall seconds of the last block

    def __call__(self, fn):
        import psutil

        proc, peak, stop = psutil.Process(), [0], threading.Event()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = proc.memory_info().rss

            def watch():
                while not stop.is_set():
                    peak[0] = max(peak[0], proc.memory_info().rss)
                    time.sleep(0.005)

            threading.Thread(target=watch, daemon=True).start()
        cpu = time.thread_time if torch.get_num_threads() == 1 else time.process_time
        t0, c0 = time.perf_counter(), cpu()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - t0
        seconds = self.wall if self.cuda else cpu() - c0
        stop.set()
        top = torch.cuda.max_memory_allocated() if self.cuda else max(peak[0], base)
        return seconds, (top - base) / 2**20


def sgd_step(model, batch, lr=1e-6):
    loss = observables.lm_loss(model, batch).mean()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(p.grad, alpha=lr)
            p.grad = None


def sgld_run(model, train, steps: int):
    cfg = suscept.SamplerConfig(step_size=1e-6, n_beta=10.0, gamma=1000.0, n_chains=1,
                                n_draws=1, thin=steps, batch_size=BATCH, seed=0, n_blocks=1)
    zero = torch.zeros(1, device=train.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        suscept.sample(model, observables.lm_loss, train, cfg,
                       observables={"none": lambda m: zero}, progress=False)


def plan_call(model, probe, components):
    specs, _ = susceptibility_observables(components) if components else (
        [observables.MeanLoss(None, name="mean_loss")], None)
    plan = observables.EvaluationPlan(model, probe, specs)
    at_w = copy.deepcopy(model)  # stands for the sampler's copy at a draw
    with torch.no_grad():
        for p in at_w.parameters():
            p.add_(torch.randn_like(p), alpha=1e-3)
    return lambda: plan(at_w)


def devinterp_step(model, batch, component="l0h0"):
    from devinterp.optim import SGMCMC
    from devinterp.slt.weight_restrictions import create_param_masks

    run_model = copy.deepcopy(model).train()
    masks = create_param_masks(run_model, component)
    params = dict(run_model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in masks)
    opt = SGMCMC.sgld([{"params": params[n], "mask": None if m is None else m.to(batch.device)}
                       for n, m in masks.items()], lr=1e-6, localization=1000.0, nbeta=10.0)

    def step():
        opt.zero_grad()
        observables.lm_loss(run_model, batch).mean().backward()
        opt.step()

    return step, sum(int(m.sum()) if m is not None else params[n].numel()
                     for n, m in masks.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=2, help="timed SGLD and SGD steps")
    ap.add_argument("--repeats", type=int, default=1, help="repeats of the step timings")
    ap.add_argument("--full", action="store_true", help="time the whole plan (GPU)")
    ap.add_argument("--devinterp", action="store_true", help="also time devinterp 2.0.1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer stand-in: checks the script")
    args = ap.parse_args()
    if args.tiny:
        GPT2.update(n_layers=2, d_model=64, n_heads=2, d_head=32, d_mlp=128, d_vocab=500)
    torch.set_num_threads(args.threads)
    dev, clock = args.device, Clock(args.device)
    g = torch.Generator().manual_seed(0)
    model = gpt2_small(dev)
    train = torch.randint(0, GPT2["d_vocab"], (64, SEQ), generator=g).to(dev)
    probe = torch.randint(0, GPT2["d_vocab"], (PROBE, SEQ), generator=g).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"GPT-2-small architecture, {n_params / 1e6:.0f}M parameters, device {dev}, torch "
          f"{torch.__version__}, {args.threads} threads, load {os.getloadavg()}; times are "
          f"{'wall' if clock.cuda else 'CPU'} seconds")
    n_layers = GPT2["n_layers"]
    comps = [c.name for c in observables.expand(
        ["all heads"] + [f"L{l}.mlp" for l in range(n_layers)], observables.Adapter.of(model))]
    sgd_model = copy.deepcopy(model)
    sgd, long, short = [], [], []
    for _ in range(args.repeats):  # interleaved: SGD steps, then the two SGLD runs
        sgd += [clock(lambda: sgd_step(sgd_model, train[:BATCH]))[0] for _ in range(args.steps)]
        long.append(clock(lambda: sgld_run(model, train, args.steps + 1))[0])
        short.append(clock(lambda: sgld_run(model, train, 1))[0])
    t_sgd = sum(sgd) / len(sgd)
    t_sgld = (sum(long) - sum(short)) / (args.steps * args.repeats)
    print(f"bare SGD step {t_sgd:.3f} s; SGLD step {t_sgld:.3f} s "
          f"(ratio {t_sgld / t_sgd:.2f}); load {os.getloadavg()}")

    if args.full:
        t_draw, mem = clock(plan_call(model, probe, comps))
        how = "measured"
    else:
        t0, mem0 = clock(plan_call(model, probe, []))
        last = n_layers - 1
        c = {k: clock(plan_call(model, probe, [k])) for k in ("L0H0", f"L{last}H0", "L0.mlp",
                                                              f"L{last}.mlp")}
        head = [c["L0H0"][0] - t0 + (c[f"L{last}H0"][0] - c["L0H0"][0]) * l / last
                for l in range(n_layers)]
        mlp = [c["L0.mlp"][0] - t0 + (c[f"L{last}.mlp"][0] - c["L0.mlp"][0]) * l / last
               for l in range(n_layers)]
        t_draw = t0 + GPT2["n_heads"] * sum(head) + sum(mlp)
        mem = max(m for _, m in c.values())
        how = "projected"
        print(f"plan of the full model only {t0:.2f} s; one head at the first / last layer: "
              f"+{head[0]:.2f} / +{head[-1]:.2f} s; MLP: +{mlp[0]:.2f} / +{mlp[-1]:.2f} s")
    print(f"evaluation plan, {len(comps)} components, probe {PROBE}x{SEQ}: {how} "
          f"{t_draw:.2f} s per draw, peak memory +{mem:.0f} MiB; load {os.getloadavg()}")
    n = CHAINS * DRAWS
    ours = n * (t_sgld + t_draw)
    print(f"projected {CHAINS} x {DRAWS} draws (thin 1): suscept one run "
          f"{ours / 3600:.2f} h (sampling {n * t_sgld / 3600:.2f} h, plan "
          f"{n * t_draw / 3600:.2f} h)")
    if args.devinterp:
        step, n_free = devinterp_step(model, train[:BATCH])
        step()  # first step allocates
        t_dev = sum(clock(step)[0] for _ in range(args.steps)) / args.steps
        t_probe = clock(plan_call(model, probe, []))[0]
        theirs = (len(comps) + 1) * n * (t_dev + t_probe)
        print(f"devinterp 2.0.1 masked SGLD step (L0H0, {n_free} free entries) {t_dev:.3f} s, "
              f"probe forward {t_probe:.2f} s; its sweep ({len(comps)} + 1 runs) "
              f"{theirs / 3600:.2f} h = {theirs / ours:.1f}x suscept; load {os.getloadavg()}")


if __name__ == "__main__":
    main()
