"""What each budget runs: ``smoke`` (seconds, tiny settings, for tests), ``quick`` (under 15 minutes
on a 2-core CPU, no downloads), ``hour`` (one CPU hour) and ``full`` (the paper's scale).

Every setting that differs from the paper's is stated in the report next to the result it made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from ..tasks.sweep import PAPER_LRS, PAPER_MODELS, PAPER_SEEDS

BUDGETS = ("smoke", "quick", "hour", "full")
TASK_MODELS = ("chain", "fbchain", "identity", "orthogonal")
VANILLA_INITS = ("identity", "orthogonal", "chain", "fbchain")
LSTM_INITS = ("orthogonal", "chain", "plain", "mixed")
#: The paper's language-model grid (section 3.1.2): 21 gains in [0.05, 1.05], fbchain betas.
PAPER_LM_SCALES = tuple(round(0.05 * k, 2) for k in range(1, 22))
PAPER_LM_BETAS = tuple(round(0.01 * k, 2) for k in range(1, 22))


@dataclass(frozen=True)
class TaskBudget:
    """One synthetic task of Figure 3: task settings and the grid (None: the paper's)."""
    T: Optional[int]
    n_train: int
    n_val: int
    epochs: int
    lrs: Tuple[float, ...]
    seeds: Tuple[int, ...]
    values: Optional[Dict[str, Tuple[float, ...]]]   # model -> swept values; None: paper's grid

    def model_values(self, model: str) -> Tuple[float, ...]:
        return PAPER_MODELS[model][1] if self.values is None else self.values[model]


@dataclass(frozen=True)
class LMBudget:
    """Language models of one corpus: model and training settings, seeds and the init grid."""
    model: Dict[str, Any]
    train: Dict[str, Any]
    seeds: Tuple[int, ...]
    scales: Tuple[Optional[float], ...] = (None,)    # None: each initializer's default
    betas: Tuple[Optional[float], ...] = (None,)     # fbchain's feedback weights


@dataclass(frozen=True)
class Budget:
    name: str
    memory: Dict[str, Any]
    decoding: Dict[str, Any]
    tasks: Dict[str, TaskBudget]
    vanilla: Dict[str, LMBudget]                     # corpus -> settings
    lstm: Dict[str, LMBudget]
    null_samples: int = 100
    toy_lines: int = 4000
    workers: int = 1
    note: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)


# ---- language-model settings ---------------------------------------------------------------

def _toy_vanilla(emsize: int, nhid: int, epochs: int, seeds: Tuple[int, ...]) -> LMBudget:
    return LMBudget(
        model=dict(rnn_type="RNN", emsize=emsize, nhid=nhid, nlayers=1, dropout=0.1, dropouth=0.1,
                   dropouti=0.1, dropoute=0.0, wdrop=0.1, nonlinearity="tanh"),
        train=dict(optimizer="adam", lr=3e-3, batch_size=32, bptt=50, epochs=epochs, eval_batch_size=10,
                   test_batch_size=10, alpha=2.0, beta=1.0, wdecay=1.2e-6),
        seeds=seeds)


def _toy_lstm(emsize: int, nhid: int, epochs: int, seeds: Tuple[int, ...]) -> LMBudget:
    return LMBudget(
        model=dict(rnn_type="LSTM", emsize=emsize, nhid=nhid, nlayers=3, dropout=0.1, dropouth=0.1,
                   dropouti=0.1, dropoute=0.0, wdrop=0.1),
        train=dict(optimizer="adam", lr=3e-3, batch_size=32, bptt=50, epochs=epochs, eval_batch_size=10,
                   test_batch_size=10, alpha=2.0, beta=1.0, wdecay=1.2e-6),
        seeds=seeds)


#: The paper's vanilla-RNN runs (section 3.1.2), flags as in docs/language-models.md.
_PAPER_VANILLA = {
    "penn": dict(model=dict(rnn_type="RNN", dropout=0.1, dropouth=0.1, dropouti=0.1, dropoute=0.1, wdrop=0.1),
                 train=dict(batch_size=20, optimizer="adam", lr=1e-3, epochs=60)),
    "pennchar": dict(model=dict(rnn_type="RNN", nlayers=3, emsize=200, nhid=1000, dropout=0.1, dropouth=0.1,
                                dropouti=0.1, dropoute=0.0, wdrop=0.1),
                     train=dict(epochs=500, alpha=0.0, beta=0.0, wdecay=1.2e-6, bptt=150, batch_size=128,
                                optimizer="adam", lr=2e-3, when=(300, 400))),
    "enwik8": dict(model=dict(rnn_type="RNN", nlayers=3, emsize=400, nhid=1840, dropout=0.0, dropouth=0.0,
                              dropouti=0.0, dropoute=0.0, wdrop=0.0),
                   train=dict(epochs=35, alpha=0.0, beta=0.0, wdecay=1.2e-6, bptt=200, batch_size=128,
                              optimizer="adam", lr=1e-3, when=(25,))),
}
_PAPER_LSTM = {
    "penn": dict(model=dict(rnn_type="LSTM", dropouti=0.4, dropouth=0.25),
                 train=dict(batch_size=20, epochs=60)),
    "pennchar": dict(model=dict(rnn_type="LSTM", nlayers=3, emsize=200, nhid=1000, dropoute=0.0, dropouth=0.25,
                                dropouti=0.1, dropout=0.1, wdrop=0.5),
                     train=dict(epochs=500, alpha=0.0, beta=0.0, wdecay=1.2e-6, bptt=150, batch_size=128,
                                optimizer="adam", lr=2e-3, when=(300, 400))),
    "enwik8": dict(model=dict(rnn_type="LSTM", nlayers=3, emsize=400, nhid=1840, dropoute=0.0, dropouth=0.1,
                              dropouti=0.1, dropout=0.4, wdrop=0.2),
                   train=dict(epochs=35, alpha=0.0, beta=0.0, wdecay=1.2e-6, bptt=200, batch_size=128,
                              optimizer="adam", lr=1e-3, when=(25,))),
}


def _paper_lm(table: Dict[str, Dict[str, Any]], corpus: str, grid: bool) -> LMBudget:
    spec = table[corpus]
    return LMBudget(model=dict(spec["model"]), train=dict(spec["train"]), seeds=(1, 2, 3),
                    scales=PAPER_LM_SCALES if grid else (None,), betas=PAPER_LM_BETAS if grid else (None,))


def _hour_real(rnn: str, corpus: str) -> LMBudget:
    """A small model for one short epoch budget on a real corpus (hour budget)."""
    char = corpus != "penn"
    return LMBudget(
        model=dict(rnn_type=rnn, emsize=128 if rnn == "RNN" else 64, nhid=256 if rnn == "RNN" else 128,
                   nlayers=1 if rnn == "RNN" else 3, dropout=0.1, dropouth=0.1, dropouti=0.1,
                   dropoute=0.0 if char else 0.1, wdrop=0.1),
        train=dict(optimizer="adam", lr=2e-3, batch_size=64, bptt=100 if char else 50, epochs=1,
                   eval_batch_size=10, test_batch_size=10),
        seeds=(1,))


# ---- the budgets ---------------------------------------------------------------------------

def _small_values(chain: Tuple[float, ...], beta: Tuple[float, ...], scale: Tuple[float, ...]):
    return {"chain": chain, "fbchain": beta, "identity": scale, "orthogonal": scale}


SMOKE = Budget(
    name="smoke",
    memory=dict(n=20, k_max=60),
    decoding=dict(n=20, steps=20, trials=60, heldout_trials=200),
    tasks={t: TaskBudget(T={"copy": 22, "addition": 20}.get(t), n_train=64, n_val=32,
                         epochs=1, lrs=(8e-4,), seeds=(1,),
                         values=_small_values((1.0,), (0.05,), (1.0,)))
           for t in ("copy", "addition", "psmnist")},
    vanilla={"toy": _toy_vanilla(16, 16, 1, (1,))},
    lstm={"toy": _toy_lstm(8, 8, 1, (1,))},
    null_samples=4, toy_lines=200,
    note="tiny settings that only show the pipeline works end to end; the verdicts mean nothing",
)

QUICK = Budget(
    name="quick",
    memory={}, decoding={},
    tasks={"copy": TaskBudget(T=50, n_train=2000, n_val=500, epochs=6, lrs=(8e-4, 3e-4), seeds=(1, 2),
                              values=_small_values((1.0,), (0.05,), (1.0,))),
           "addition": TaskBudget(T=50, n_train=2000, n_val=500, epochs=6, lrs=(8e-4, 3e-4), seeds=(1, 2),
                                  values=_small_values((1.0,), (0.05,), (1.0,))),
           "psmnist": TaskBudget(T=None, n_train=1000, n_val=500, epochs=1, lrs=(8e-4,), seeds=(1,),
                                 values=_small_values((1.0,), (0.05,), (1.0,)))},
    vanilla={"toy": _toy_vanilla(64, 128, 4, (1,))},
    lstm={"toy": _toy_lstm(32, 64, 3, (1,))},
    null_samples=100, toy_lines=4000, workers=2,
    note="sections 1-2 at the paper's settings; 3-6 on short sequences, few epochs and a few grid "
         "points, language models on the generated toy corpus",
)

HOUR = Budget(
    name="hour",
    memory={}, decoding={},
    # Calibrated on a quiet 2-core CPU (2026-12-01): the first version of this budget (2,000
    # sequences, 8 epochs, 2 seeds, 10 and 8 language-model epochs) took 3.2 CPU minutes.
    tasks={"copy": TaskBudget(T=100, n_train=8000, n_val=1000, epochs=30, lrs=(8e-4,), seeds=(1, 2, 3),
                              values=_small_values((1.0, 1.02), (0.02, 0.05), (1.0, 0.99))),
           "addition": TaskBudget(T=100, n_train=8000, n_val=1000, epochs=30, lrs=(8e-4,), seeds=(1, 2, 3),
                                  values=_small_values((1.0, 1.02), (0.02, 0.05), (1.0, 0.99))),
           "psmnist": TaskBudget(T=None, n_train=6000, n_val=1000, epochs=5, lrs=(8e-4,), seeds=(1, 2),
                                 values=_small_values((1.0,), (0.05,), (1.0,)))},
    vanilla={"toy": _toy_vanilla(64, 128, 15, (1, 2, 3)), "penn": _hour_real("RNN", "penn")},
    lstm={"toy": _toy_lstm(32, 64, 10, (1, 2, 3))},
    null_samples=100, toy_lines=10000, workers=2,
    note="sections 3-6 with longer sequences, more data, epochs, grid values and seeds (about one "
         "CPU hour); word PTB (if present) for one epoch of a small vanilla RNN",
)

FULL = Budget(
    name="full",
    memory={}, decoding={},
    tasks={t: TaskBudget(T=None, n_train=60_000, n_val=10_000, epochs=100, lrs=PAPER_LRS, seeds=PAPER_SEEDS,
                         values=None)
           for t in ("copy", "addition", "psmnist")},
    vanilla={c: _paper_lm(_PAPER_VANILLA, c, grid=True) for c in ("penn", "pennchar", "enwik8")},
    lstm={c: _paper_lm(_PAPER_LSTM, c, grid=False) for c in ("penn", "pennchar", "enwik8")},
    null_samples=100, workers=8,
    note="the paper's grids, sequence lengths, epochs and corpora (GPUs or a cluster: weeks of CPU)",
)

BY_NAME = {b.name: b for b in (SMOKE, QUICK, HOUR, FULL)}
