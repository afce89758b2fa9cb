"""Do the components that explain a trigger flag carry the trigger? Contributions against
ablation.

For the trigger organism (:mod:`experiments.backdoor`), the per-token fluctuation detector
flags the token right after the trigger (the loss of predicting ``TARGET``). Its score there is
a sum of per-component contributions (:meth:`suscept.anomaly.Detector.contributions`,
``c_C = d_C (P d)_C``). The heads that carry the trigger are found independently by mean
ablation: replace head ``h``'s ``hook_z`` by its mean over clean sequences and measure the rise
of the ``TARGET`` loss after the trigger. Reported: both per head and their Spearman
correlation over the 8 heads (with embed and unembed listed for the contributions).

    python -m experiments.anomaly_circuit results/anomaly/profiles_trigger0.03_seed0.pt
        [--seed 0 --rate 0.03]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import Tensor, nn

from experiments import anomaly_profiles as ap
from experiments import backdoor
from experiments.zoo.language import make_dataset
from suscept import anomaly
from suscept.susceptibilities import spearman


@torch.no_grad()
def head_ablation(model: nn.Module, triggered: Tensor, clean: Tensor) -> Tensor:
    """``[n_layers * n_heads]`` rise of the mean ``TARGET`` loss after the trigger when one
    head's ``hook_z`` is replaced by its mean over ``clean`` sequences (mean ablation)."""
    where = (triggered == backdoor.TRIGGER).int().argmax(1)
    rows = torch.arange(len(triggered))

    def target_loss(hooks=()) -> float:
        logits = model.run_with_hooks(triggered, fwd_hooks=list(hooks))
        return float(-logits.log_softmax(-1)[rows, where, backdoor.TARGET].mean())

    base = target_loss()
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_z"))
    out = []
    for layer in range(model.cfg.n_layers):
        mean_z = cache[f"blocks.{layer}.attn.hook_z"].mean((0, 1))  # [head, d_head]
        for head in range(model.cfg.n_heads):
            def hook(z, hook, head=head, mean_z=mean_z):
                z[:, :, head] = mean_z[head]
                return z
            out.append(target_loss([(f"blocks.{layer}.attn.hook_z", hook)]) - base)
    return torch.tensor(out)


def trigger_contributions(profiles: dict) -> tuple[Tensor, Tensor]:
    """``[K]`` mean contribution of each component to the per-token fluctuation detector's
    score at the token after the trigger (the detector fitted on trusted tokens, part 0), and
    ``[K]`` the mean z-score ``(x_C - mean_C) / sd_C`` of the profile there."""
    tf, part, tokens = profiles["token_fluctuation"], profiles["part"], profiles["tokens"]
    det = anomaly.fit(tf[part == 0].flatten(0, 1), tf[part == 1].flatten(0, 1))
    trig = (part == 3).nonzero().flatten()
    where = (tokens[trig] == backdoor.TRIGGER).int().argmax(1)
    x = tf[trig, where].double()
    return det.contributions(x).mean(0), ((x - det.mean) / det.scale).mean(0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profiles", help="a profiles_trigger*.pt of experiments.anomaly_kinds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.03)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    profiles = torch.load(args.profiles, weights_only=False)
    model = backdoor.backdoored_model(args.seed, args.rate).model
    ablation = head_ablation(model, backdoor.triggered(64, args.seed),
                             make_dataset(64, seed=90_000 + args.seed).tokens)
    contrib, z = trigger_contributions(profiles)
    heads = len(ablation)
    rho = {name: float(spearman(ablation[:, None].double(), v[:heads, None].double())[0])
           for name, v in (("contribution", contrib), ("abs_contribution", contrib.abs()),
                           ("z_score", z))}
    out = {"components": ap.COMPONENTS, "ablation": ablation.tolist(),
           "contribution": contrib.tolist(), "z_score": z.tolist(), "spearman_heads": rho}
    for c, a, k, zz in zip(ap.COMPONENTS, ablation.tolist() + [None] * 2, contrib.tolist(),
                           z.tolist()):
        print(f"{c:8s} ablation {'' if a is None else f'{a:+.3f}':>7s}  contribution {k:+8.2f}"
              f"  z-score {zz:+.2f}")
    print("Spearman over heads, ablation rise against: "
          + ", ".join(f"{k} {v:+.2f}" for k, v in rho.items()))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
