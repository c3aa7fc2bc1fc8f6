"""The first Adam steps of a vanilla-RNN language model: training loss, the spectral radius of
each recurrent weight, and how coherent the update is.

    python bench/first_steps.py --data DIR [--nonlinearity elu] [--init fbchain] [--nhid 256]
                                [--lr 2e-3] [--warmup 0] [--steps 30] [--bptt 150] [...]

It builds the model of ``main.py`` (:class:`awd_nonnormal.model.RNNModel`, one layer, untied by
default so that the layer has ``--nhid`` units) and trains it the way ``main.py`` does (cross
entropy + AR/TAR, gradient clipping, Adam with ``--warmup`` linear warm-up), but at a fixed BPTT
length, and prints one line per step:

* ``loss``: the batch's cross entropy (nats; the uniform guess is ``ln V``);
* ``rho``: the spectral radius of layer 0's raw recurrent weight after the step;
* ``coh``: ``||dW||_2 / (lr_t * N)``, the update's largest singular value over the largest a
  matrix of entries ``+-lr_t`` can have. Adam's first step is ``-lr * sign(g)`` entry by entry;
  for a gradient of rank one (``sum_t delta_t h_{t-1}^T`` dominated by one direction) its signs
  form a rank-one matrix, ``coh`` is 1 and the step is a rank-one matrix of norm ``lr * N``. For
  independent random signs ``coh`` is about ``2 / sqrt(N)``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from awd_nonnormal.data import batchify, get_batch, load_corpus  # noqa: E402
from awd_nonnormal.init import InitOptions  # noqa: E402
from awd_nonnormal.lm import activation_regularization, warmup_factor  # noqa: E402
from awd_nonnormal.model import ModelConfig, RNNModel  # noqa: E402


def raw_weight_hh(layer) -> torch.Tensor:
    """The trained recurrent weight of a (possibly weight-dropped) layer, (N, N)."""
    w = getattr(layer, "weight_hh_l0_raw", None)
    return w if w is not None else layer.module.weight_hh_l0 if hasattr(layer, "module") else layer.weight_hh_l0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--nonlinearity", default="elu")
    p.add_argument("--init", default="fbchain")
    p.add_argument("--init-alpha", type=float, default=None, help="alpha of chain / fbchain")
    p.add_argument("--init-scale", type=float, default=None)
    p.add_argument("--emsize", type=int, default=64)
    p.add_argument("--nhid", type=int, default=256)
    p.add_argument("--tied", action="store_true")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--bptt", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--wdrop", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=2.0)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--clip", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=1111)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    corpus = load_corpus(args.data)
    V = len(corpus.dictionary)
    params = {k: v for k, v in (("alpha", args.init_alpha), ("scale", args.init_scale)) if v is not None}
    cfg = ModelConfig(rnn_type="RNN", ntoken=V, emsize=args.emsize, nhid=args.nhid, nlayers=1,
                      dropout=args.dropout, dropouth=args.dropout, dropouti=args.dropout, dropoute=0.0,
                      wdrop=args.wdrop, tied=args.tied, nonlinearity=args.nonlinearity,
                      init=InitOptions(args.init, params))
    model = RNNModel(cfg)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1.2e-6)
    data = batchify(corpus.train, args.batch_size)  # (rows, B)
    w = raw_weight_hh(model.rnns[0])
    N = w.size(0)
    rho = torch.linalg.eigvals(w.detach().double()).abs().max().item()
    print(f"V {V} (ln V {math.log(V):.2f}), N {N}, {args.nonlinearity} {args.init}, lr {args.lr:g}, "
          f"warmup {args.warmup}; rho at init {rho:.3f}")
    print(f"{'step':>4} {'lr_t':>9} {'loss':>10} {'rho':>7} {'coh':>6}")
    hidden = model.init_hidden(args.batch_size)
    pos = 0
    for step in range(1, args.steps + 1):
        if pos + args.bptt + 1 >= data.size(0):
            pos = 0
        x, y = get_batch(data, pos, args.bptt)  # (L, B), (L*B,)
        pos += args.bptt
        hidden = [h.detach() for h in hidden]
        lr_t = args.lr * warmup_factor(step, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr_t
        opt.zero_grad(set_to_none=True)
        logits, hidden, raw, out = model(x, hidden, return_h=True)  # (L, B, V)
        ce = F.cross_entropy(logits.view(-1, V), y)
        (ce + activation_regularization(raw[-1], out[-1], args.alpha, args.beta)).backward()
        if not all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None):
            print(f"{step:>4} {lr_t:>9.2e} {ce.item():>10.4g}  non-finite gradient: stop")
            break
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        before = w.detach().clone()
        opt.step()
        dw = (w.detach() - before).double()
        rho = torch.linalg.eigvals(w.detach().double()).abs().max().item()
        coh = torch.linalg.matrix_norm(dw, ord=2).item() / (lr_t * N)
        print(f"{step:>4} {lr_t:>9.2e} {ce.item():>10.4g} {rho:>7.3f} {coh:>6.3f}")


if __name__ == "__main__":
    main()
