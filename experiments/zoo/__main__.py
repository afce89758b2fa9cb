"""Train (or load from the cache) the zoo's models and print their mechanistic summary.

    python -m experiments.zoo [--arch attn mlp] [--seed 0] [--cache-dir results/zoo]
                              [--threads 1] [--steps N]

Prints per model: training time, final held-out loss by token type, previous-token and
induction scores of every head (read layer 0 for the former, layer 1 for the latter) and the
loss increase on induction and bigram tokens when one head is zero-ablated.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import observables  # noqa: E402
from experiments.zoo.heads import ablation_effects, head_scores  # noqa: E402
from experiments.zoo.language import make_dataset  # noqa: E402
from experiments.zoo.train import ARCHS, EVAL_SEED, TrainConfig, train_or_load  # noqa: E402


def _row(name: str, values) -> str:
    return f"    {name:<22}" + " ".join(f"{float(v):7.3f}" for v in values)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.zoo",
                                description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default="results/zoo")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is about as fast for these models and robust when "
                        "other processes share the CPU)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: TrainConfig)")
    p.add_argument("--quiet", action="store_true", help="no training log")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = TrainConfig()
    if args.steps is not None:
        config = dataclasses.replace(config, steps=args.steps)
    probe = make_dataset(512, seed=EVAL_SEED, language_seed=config.language_seed)
    print(f"backend {observables.backend()}; config {dataclasses.asdict(config)}")
    for arch in args.arch:
        print(f"\n== {arch} (seed {args.seed}) ==", flush=True)
        t = train_or_load(arch, args.seed, args.cache_dir, config, verbose=not args.quiet)
        model = t.model
        n_params = sum(q.numel() for q in model.parameters())
        src = "loaded from cache" if t.from_cache else "trained now"
        print(f"  {t.path}  ({src}); {n_params} parameters; "
              f"training took {t.train_seconds:.1f} s for {config.steps} steps "
              f"on {t.curve['torch_threads']} thread(s)")
        print(f"  final held-out loss by predicted-token type ({config.n_eval} sequences; nats):")
        for k, v in t.final_loss_by_type().items():
            print(f"    {k:<14} {v:.3f}")
        s = head_scores(model, n_sequences=128)
        heads_hdr = " ".join(f"{'head ' + str(h):>7}" for h in range(model.cfg.n_heads))
        print(f"  head scores on repeated random sequences   {heads_hdr}")
        for layer in range(model.cfg.n_layers):
            print(_row(f"L{layer} previous-token", s.prev_token[layer]))
        for layer in range(model.cfg.n_layers):
            print(_row(f"L{layer} induction", s.induction[layer]))
        for kind in ("induction", "bigram"):
            eff, clean = ablation_effects(model, probe, kind)
            print(f"  zero-ablation: loss increase on {kind} tokens (clean {clean:.3f}; "
                  "512 sequences)")
            for layer in range(model.cfg.n_layers):
                print(_row(f"L{layer}", eff[layer]))


if __name__ == "__main__":
    main()
