"""``python -m awd_nonnormal.experiments {memory,decoding}``: the paper's theory figures.

memory    Figure 1b-c: Fisher memory curves and pulse propagation of four N = 100 networks.
decoding  Figure 2 / Appendix A: linear decoding of s_1 from h_100, chain vs orthogonal.

Each prints its table and writes a PNG (``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time

from .. import cli, plots
from ..runs import check_output_file
from . import DecodingConfig, MemoryConfig, linear_decoding, memory_curves


def _memory(args: argparse.Namespace) -> None:
    cfg = MemoryConfig(n=args.n, k_max=args.k_max, lam=args.lam, alpha=args.alpha,
                       fb_alpha=args.fb_alpha, fb_beta=args.fb_beta, seed=args.seed)
    curves = memory_curves(cfg)
    params = {"identity": f"lambda={cfg.lam}", "orthogonal": f"lambda={cfg.lam}",
              "chain": f"alpha={cfg.alpha}", "fbchain": f"alpha={cfg.fb_alpha}, beta={cfg.fb_beta}"}
    print(f"Fisher memory, N = {cfg.n} (Ganguli et al. 2008; paper Figure 1b-c). J_tot <= N = {cfg.n}.")
    print(f"{'network':<12}{'parameters':<24}{'J_tot':>10}{'J(0)':>9}{'J(10)':>9}{'J(50)':>9}{'peak ||h||':>12}")
    for c in curves:
        j = lambda k: float(c.J[k]) if k < len(c.J) else float("nan")  # noqa: E731
        print(f"{c.name:<12}{params[c.name]:<24}{c.J_tot:>10.3f}{j(0):>9.4f}{j(10):>9.4f}{j(50):>9.4f}"
              f"{float(c.pulse.max()):>12.3g}")
    print(f"figure: {plots.memory_figure(curves, args.out)}")


def _decoding(args: argparse.Namespace) -> None:
    cfg = DecodingConfig(n=args.n, scale=args.scale, steps=args.steps, trials=args.trials,
                         heldout_trials=args.heldout_trials, seed=args.seed)
    rows = linear_decoding(cfg)
    print(f"Linear decoding of s_1 from h_{cfg.steps}, N = {cfg.n}, scale {cfg.scale} (paper Figure 2, "
          f"Appendix A). In-sample R^2 on {cfg.trials} trials (as the paper); held-out R^2 fitted on "
          f"{cfg.heldout_trials // 2} trials and scored on {cfg.heldout_trials - cfg.heldout_trials // 2} others.")
    print(f"{'condition':<22}{'model':<12}{'R2 in sample':>14}{'R2 held out':>13}")
    for r in rows:
        cond = f"{r.nonlinearity}, " + (f"sigma={r.noise:g}" if r.noise else "no noise")
        print(f"{cond:<22}{r.model:<12}{r.in_sample:>14.3f}{r.held_out:>13.3f}")
    print(f"figure: {plots.decoding_figure(rows, args.out, steps=cfg.steps)}")


PROG = "python -m awd_nonnormal.experiments"


def main(argv=None) -> int:
    parser = cli.Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("memory", help="Fisher memory curves (Figure 1b-c)")
    d = MemoryConfig()
    m.add_argument("--n", type=int, default=d.n, help="network size (default %(default)s)")
    m.add_argument("--k-max", type=int, default=d.k_max, help="curve length (default %(default)s)")
    m.add_argument("--lam", type=float, default=d.lam, help="identity/orthogonal scale, < 1 (default %(default)s)")
    m.add_argument("--alpha", type=float, default=d.alpha, help="chain weight (default %(default)s)")
    m.add_argument("--fb-alpha", type=float, default=d.fb_alpha, help="fbchain forward weight (default %(default)s)")
    m.add_argument("--fb-beta", type=float, default=d.fb_beta, help="fbchain feedback weight (default %(default)s)")
    m.add_argument("--seed", type=int, default=d.seed, help="seed of the random networks (default %(default)s)")
    m.add_argument("--out", default="figures/memory_curves.png", help="PNG path (default %(default)s)")
    m.set_defaults(run=_memory)

    c = sub.add_parser("decoding", help="linear decoding, chain vs orthogonal (Figure 2, 7, 8)")
    d2 = DecodingConfig()
    c.add_argument("--n", type=int, default=d2.n, help="network size (default %(default)s)")
    c.add_argument("--scale", type=float, default=d2.scale, help="recurrent scale of both models (default %(default)s)")
    c.add_argument("--steps", type=int, default=d2.steps, help="decode s_1 from h_steps (default %(default)s)")
    c.add_argument("--trials", type=int, default=d2.trials, help="trials for the in-sample fit (default %(default)s)")
    c.add_argument("--heldout-trials", type=int, default=d2.heldout_trials,
                   help="trials for the held-out estimate, split in halves, at least 4 (default %(default)s)")
    c.add_argument("--seed", type=int, default=d2.seed, help="seed (default %(default)s)")
    c.add_argument("--out", default="figures/linear_decoding.png", help="PNG path (default %(default)s)")
    c.set_defaults(run=_decoding)

    for sp in (m, c):
        cli.add_threads_argument(sp, help="torch CPU threads (default %(default)s: these small "
                                          "matmuls run fastest on one; 0: torch's default)")
    args = parser.parse_args(argv)
    for name in ("n", "steps", "trials", "heldout_trials", "k_max"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.command == "decoding" and args.heldout_trials < 4:
        # fitted on one half, scored on the other: an R^2 needs at least 2 scored trials
        parser.error(f"--heldout-trials must be at least 4 (split in halves, one to fit and one "
                     f"of at least 2 trials to score), got {args.heldout_trials}")

    def command() -> int:
        check_output_file(args.out, "--out")  # before the work, not after it
        cli.setup_cpu(args.threads)
        start = time.time()
        args.run(args)
        print(f"({time.time() - start:.1f} s)")
        return cli.EXIT_OK

    return cli.run_command(PROG, command, interrupted="interrupted")


if __name__ == "__main__":
    sys.exit(main())
