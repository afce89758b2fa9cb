"""Hyperparameter calibration: top Hessian eigenvalue and the stability-based choice."""

import torch

import suscept
from suscept.calibrate import calibrate, top_hessian_eigenvalue
from suscept.exact import Point, quadratic_losses, random_problem


def test_top_eigenvalue_of_a_quadratic():
    m, a = random_problem(6, 4, seed=2)
    lam = top_hessian_eigenvalue(Point(torch.zeros(4, dtype=torch.float64)), quadratic_losses,
                                 (m, a), n_iter=200, tol=1e-12)
    exact = torch.linalg.eigvalsh(a.mean(0)).max().item()
    assert abs(lam - exact) < 1e-6 * exact


def test_calibrate_rejects_unstable_and_picks_an_acceptable_cell():
    m, a = random_problem(6, 3, seed=4)
    wstar = torch.linalg.solve(a.mean(0), torch.einsum("ijk,ik->j", a, m) / 6)
    lam = torch.linalg.eigvalsh(a.mean(0)).max().item()
    n_beta, gamma = 10.0, 5.0
    p_max = n_beta * lam + gamma
    steps = [0.05 / p_max, 0.3 / p_max, 5.0 / p_max]  # stable, stable, divergent (> 4)
    base = suscept.SamplerConfig(step_size=1.0, n_beta=1.0, n_chains=3, n_draws=60, thin=5,
                                 burn_in=100)
    cal = calibrate(Point(wstar), quadratic_losses, (m, a), (m, a), base, step_sizes=steps,
                    n_betas=[n_beta], gammas=[gamma])
    assert abs(cal.lambda_max - lam) < 1e-3 * lam
    by_step = {c["step_size"]: c for c in cal.cells}
    assert by_step[steps[2]]["divergences"] > 0 and not by_step[steps[2]]["acceptable"]
    assert by_step[steps[0]]["stability"] < by_step[steps[1]]["stability"] < 0.4
    assert cal.chosen is not None and cal.chosen.step_size in steps[:2]
    assert "stability" in cal.table()


def test_calibration_gives_a_schedule():
    """The chosen cell's pilot (IAT of its probe loss in steps, seconds per step) feeds
    suscept.schedule.schedule: the same Schedule as calling it by hand."""
    from suscept.schedule import schedule

    m, a = random_problem(6, 3, seed=4)
    wstar = torch.linalg.solve(a.mean(0), torch.einsum("ijk,ik->j", a, m) / 6)
    p_max = 10.0 * torch.linalg.eigvalsh(a.mean(0)).max().item() + 5.0
    base = suscept.SamplerConfig(step_size=1.0, n_beta=1.0, n_chains=3, n_draws=60, thin=5,
                                 burn_in=50)
    cal = calibrate(Point(wstar), quadratic_losses, (m, a), (m, a), base,
                    step_sizes=[0.05 / p_max, 0.3 / p_max], n_betas=[10.0], gammas=[5.0])
    cell = next(c for c in cal.cells if c["chosen"])
    assert cell["step_size"] == cal.chosen.step_size and sum(c["chosen"] for c in cal.cells) == 1
    assert cell["tau_steps"] >= 1 and cell["step_seconds"] > 0
    plan = cal.schedule(500, eval_seconds=0.01)
    assert plan == schedule(cell["tau_steps"], cell["step_seconds"], 0.01, ess=500,
                            burn_in=50, n_chains=4)
    assert plan.n_chains * plan.n_draws >= 500 * plan.tau_draws
