"""The paper's Keras 2.2 training rules: global-norm clipping and its overflow verdict, the capped
loss, one bias in the task RNN; and their wiring into the task trainer and its command line."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from awd_nonnormal.tasks import __main__ as cli
from awd_nonnormal.tasks import rules as R
from awd_nonnormal.tasks import sweep as S
from awd_nonnormal.tasks import train as T

OPTS = T.RunOptions(progress=False)


def _pythagorean():
    """Gradients whose global norm is 13 by construction: ||(3, 4)|| = 5, ||(12)|| = 12."""
    return [torch.tensor([[3.0, 0.0], [0.0, 4.0]]), torch.tensor([12.0])]


# ---------------------------------------------------------------- clipping

@pytest.mark.parametrize("c", [6.5, 1.0, 13.0, 26.0])
def test_global_clip_is_keras_formula(c):
    """Keras 2.2: every tensor times c / max(n, c), with n = 13 the norm of all of them."""
    grads = _pythagorean()
    expected = [g * (c / max(13.0, c)) for g in _pythagorean()]
    res = R.clip_gradients_(grads, c, "global")
    assert float(res.norm) == 13.0 and not bool(res.overflow)
    for g, e in zip(grads, expected):
        assert torch.allclose(g, e, rtol=1e-7, atol=0)
    if c >= 13.0:  # at or under the limit: untouched, bit for bit
        assert all(torch.equal(g, e) for g, e in zip(grads, _pythagorean()))


def test_global_clip_of_random_gradients_float64():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, 5, generator=gen, dtype=torch.float64) * 4,
             torch.randn(5, generator=gen, dtype=torch.float64)]
    n = math.sqrt(sum(float((g * g).sum()) for g in grads))
    expected = [g * 3.0 / max(n, 3.0) for g in grads]
    R.clip_gradients_(grads, 3.0, "global")
    for g, e in zip(grads, expected):
        assert torch.allclose(g, e, rtol=1e-12, atol=0)
    assert math.sqrt(sum(float((g * g).sum()) for g in grads)) == pytest.approx(3.0, rel=1e-12)


def test_tensor_clip_scales_each_tensor_by_its_own_norm():
    grads = _pythagorean()
    res = R.clip_gradients_(grads, 6.5, "tensor")
    assert torch.equal(grads[0], _pythagorean()[0])             # norm 5 <= 6.5: untouched
    assert torch.allclose(grads[1], torch.tensor([6.5]), rtol=1e-7, atol=0)  # 12 * 6.5 / 12
    assert float(res.norm) == 12.0 and not bool(res.overflow)


def test_none_leaves_gradients():
    grads = _pythagorean()
    res = R.clip_gradients_(grads, 1.0, "none")
    assert all(torch.equal(g, e) for g, e in zip(grads, _pythagorean()))
    assert float(res.norm) == 13.0


@pytest.mark.parametrize("mode", ["global", "tensor"])
@pytest.mark.parametrize("bad", [3e19, math.inf, math.nan])
def test_overflowing_norm_zeroes_every_tensor(mode, bad):
    """3e19 squared overflows float32 (max 3.4e38): the norm is inf, as in Keras, and no tensor may
    move, not even the ones whose own norm is finite; no NaN from inf * 0 either."""
    grads = [torch.tensor([bad, 1.0]), torch.tensor([12.0])]
    res = R.clip_gradients_(grads, 10.0, mode)
    assert bool(res.overflow) and not math.isfinite(float(res.norm))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("mode", ["global", "tensor"])
def test_members_are_clipped_each_on_its_own(mode):
    """A leading member axis: each member gets exactly what it would get alone."""
    gen = torch.Generator().manual_seed(1)
    members = [[torch.randn(4, 3, generator=gen) * s, torch.randn(3, generator=gen) * s]
               for s in (0.1, 5.0, 50.0)]
    members.append([torch.tensor([[3e19, 0, 0]] * 4), torch.ones(3)])  # overflows
    stacked = [torch.stack([m[k] for m in members]) for k in range(2)]  # (M, ...)
    res = R.clip_gradients_(stacked, 4.0, mode, members=True)
    assert res.overflow.tolist() == [False, False, False, True]
    for i, m in enumerate(members):
        alone = [g.clone() for g in m]
        one = R.clip_gradients_(alone, 4.0, mode)
        assert float(res.norm[i]) == pytest.approx(float(one.norm)) or i == 3
        for k in range(2):
            assert torch.allclose(stacked[k][i], alone[k], rtol=1e-6, atol=0)


def test_bad_clip_arguments():
    with pytest.raises(ValueError, match="unknown clip mode 'x'; valid: global, tensor, none"):
        R.clip_gradients_(_pythagorean(), 1.0, "x")
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        R.clip_gradients_(_pythagorean(), 0.0)


# ---------------------------------------------------------------- loss

def test_keras_loss_equals_exact_inside_the_clip():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 9, generator=gen, dtype=torch.float64)  # probabilities ~ 1e-3..0.9
    target = torch.randint(0, 9, (4, 6), generator=gen)
    p = torch.softmax(logits, -1).gather(-1, target.unsqueeze(-1))
    assert (p > 1e-7).all() and (p < 1 - 1e-7).all()
    exact = R.classification_loss(logits, target, "exact")
    assert torch.allclose(exact, -torch.log(p.squeeze(-1)), rtol=1e-12)
    assert torch.allclose(R.classification_loss(logits, target, "keras"), exact, rtol=1e-12)
    mean = F.cross_entropy(logits.reshape(-1, 9), target.reshape(-1))
    assert torch.allclose(exact.mean(), mean, rtol=1e-12)


def test_keras_loss_of_saturated_steps_is_capped_and_passes_no_gradient():
    # step 0: the target's probability ~ e^-40 < 1e-7; step 1: ~ 1 - 8e-18 > 1 - 1e-7
    logits = torch.tensor([[0.0, 40.0, 0.0], [40.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([0, 0])
    loss = R.classification_loss(logits, target, "keras")
    assert loss[0].item() == pytest.approx(-math.log(1e-7), rel=1e-6)  # 16.118 nats
    assert loss[0].item() == pytest.approx(16.118, abs=1e-3)
    assert loss[1].item() == pytest.approx(-math.log(float(torch.tensor(1 - 1e-7))), rel=1e-3)
    loss.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    exact = R.classification_loss(logits.detach(), target, "exact")
    assert exact[0].item() == pytest.approx(40.0, rel=1e-5)  # the exact loss is not capped


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'mse'; valid: exact, keras"):
        R.classification_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), "mse")


# ---------------------------------------------------------------- one bias

def _keras_forward(x, V, U, b, f, h0):
    """Keras SimpleRNN: h_t = f(x_t V + h_{t-1} U + b), written step by step."""
    hs, h = [], h0
    for t in range(x.shape[0]):
        h = f(x[t] @ V + h @ U + b)
        hs.append(h)
    return torch.stack(hs)


def _tiny(**kw):
    base = dict(task="copy", T=25, n_train=48, n_val=16, epochs=1, hidden=12, init="chain",
                init_scale=1.0, lr=1e-2, seed=1)
    return T.make_config(**{**base, **kw})


def test_task_model_has_one_trainable_bias_and_is_a_keras_simple_rnn(tmp_path):
    out = T.train(_tiny(), tmp_path / "run", OPTS)
    assert out.result["status"] == "completed"
    model = T.build_model(_tiny())
    ck = torch.load(tmp_path / "run" / T.CHECKPOINT_FILE, weights_only=True)
    model.load_state_dict(ck["model"])
    trainable = [n for n, p in model.rnn.named_parameters() if p.requires_grad and "bias" in n]
    assert trainable == ["bias_ih_l0"]
    b_hh = model.rnn.bias_hh_l0
    assert torch.equal(b_hh, torch.zeros_like(b_hh))        # frozen at zero through training
    b = model.rnn.bias_ih_l0.detach()
    assert b.abs().max() > 0                                 # the one bias did train
    x = torch.nn.functional.one_hot(torch.randint(0, 10, (25, 3)), 10).float()  # (T, B, d)
    h = _keras_forward(x, model.rnn.weight_ih_l0.detach().T, model.rnn.weight_hh_l0.detach().T, b,
                       torch.nn.functional.elu, torch.zeros(3, 12))
    with torch.no_grad():
        ours = model(x)
    assert torch.allclose(ours, model.decoder(h).detach(), atol=1e-5)


def test_two_biases_option_trains_both(tmp_path):
    out = T.train(_tiny(biases=2), tmp_path / "run", OPTS)
    model = T.build_model(_tiny(biases=2))
    model.load_state_dict(torch.load(tmp_path / "run" / T.CHECKPOINT_FILE, weights_only=True)["model"])
    assert out.result["status"] == "completed"
    # PyTorch's two biases get the same gradient; under RMSprop they move in lockstep
    assert torch.allclose(model.rnn.bias_ih_l0, model.rnn.bias_hh_l0)
    assert model.rnn.bias_hh_l0.abs().max() > 0


def test_single_bias_needs_biases():
    from awd_nonnormal.rnn import RNN
    with pytest.raises(ValueError, match="no biases"):
        R.single_bias_(RNN(2, 3, bias=False))


# ---------------------------------------------------------------- trainer and command line

def test_defaults_are_keras_rules_and_old_configs_read_as_they_ran():
    c = T.make_config(task="copy")
    assert (c.clip_mode, c.biases, c.loss) == ("global", 1, "exact")
    old = {k: v for k, v in c.to_dict().items() if k not in ("biases", "loss")}
    assert T.config_from_dict(old).biases == 2 and T.config_from_dict(old).loss == "exact"


@pytest.mark.parametrize("kw,match", [
    (dict(task="addition", loss="keras"), "applies to the classification tasks"),
    (dict(loss="nll"), "unknown loss 'nll'; valid: exact, keras"),
    (dict(biases=3), "biases must be one of 1, 2"),
])
def test_bad_rule_settings(kw, match):
    with pytest.raises(T.TaskError, match=match):
        T.make_config(**kw)


def test_keras_loss_run_records_capped_validation_loss(tmp_path):
    out = T.train(_tiny(loss="keras"), tmp_path / "run", OPTS)
    exact = T.train(_tiny(), tmp_path / "exact", OPTS)
    # nothing saturates in this short run, so the two losses agree to rounding
    assert out.result["final_val_loss"] == pytest.approx(exact.result["final_val_loss"], rel=1e-4)


def test_cli_flags_reach_the_config(tmp_path, capsys):
    rc = cli.main(["train", "--task", "copy", "--T", "25", "--n-train", "16", "--n-val", "16",
                   "--epochs", "1", "--hidden", "8", "--clip-mode", "tensor", "--biases", "2",
                   "--loss", "keras", "--out", str(tmp_path / "run"), "--no-progress"])
    assert rc == 0
    stored = json.loads((tmp_path / "run" / T.CONFIG_FILE).read_text())["config"]
    assert (stored["clip_mode"], stored["biases"], stored["loss"]) == ("tensor", 2, "keras")
    args = cli.build_parser().parse_args(["sweep", "--task", "copy", "--models", "chain", "--T", "25",
                                          "--clip-mode", "tensor", "--biases", "2", "--loss", "keras"])
    plan = S.plan_sweep(S.grid_from_args(models="chain", lrs="1e-3", seeds="1", values=["chain=1.0"]),
                        cli._task_kwargs(args), tmp_path / "sw")
    assert {(r.config.clip_mode, r.config.biases, r.config.loss) for r in plan.runs} == {("tensor", 2, "keras")}
    rc = cli.main(["train", "--task", "addition", "--loss", "keras", "--out", str(tmp_path / "a")])
    assert rc == 2 and "classification tasks" in capsys.readouterr().err


def test_old_sweep_folder_continues_with_its_rules_only(tmp_path):
    grid = S.grid_from_args(models="chain", lrs="1e-3", seeds="1", values=["chain=1.0"])
    old_rules = {"task": "copy", "T": 25, "clip_mode": "tensor", "biases": 2}
    settings = S.plan_sweep(grid, old_rules, tmp_path).settings
    legacy = {k: v for k, v in settings.items() if k not in ("biases", "loss")}
    (tmp_path / S.SWEEP_FILE).write_text(json.dumps({"settings": legacy}))
    assert S.plan_sweep(grid, old_rules, tmp_path).runs
    with pytest.raises(T.RunConflict, match="biases: 2 vs 1"):
        S.plan_sweep(grid, {"task": "copy", "T": 25}, tmp_path)


def test_one_bias_checkpoint_is_read_by_analyze(tmp_path):
    import analyze
    T.train(_tiny(), tmp_path / "run", OPTS)
    rc = analyze.main([str(tmp_path / "run" / T.CHECKPOINT_FILE), "--no-figures", "--out",
                       str(tmp_path / "an"), "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "an" / "analysis.json").read_text())
    (ck,) = data["checkpoints"]
    assert ck["layers"] and "chain" in json.dumps(ck)


@pytest.mark.parametrize("loss", R.LOSSES)
def test_class_first_logits_give_the_same_loss_and_gradient(loss):
    """Logits stored class-first (a (T, B, C) view of (C, T, B) memory, as TaskModel returns them)
    take the fast softmax over the leading axis: the same per-step losses and gradients as
    contiguous logits, checked against -log softmax written out here."""
    gen = torch.Generator().manual_seed(3)
    logits = (4 * torch.randn(7, 5, 9, generator=gen, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, 9, (7, 5), generator=gen)
    first = logits.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert not first.is_contiguous() and torch.equal(first, logits)
    log_p = logits - logits.exp().sum(-1, keepdim=True).log()
    expected = -log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if loss == "keras":
        expected = expected.clamp(max=-math.log(R.KERAS_EPSILON))
    for x in (logits, first):
        got = R.classification_loss(x, target, loss)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    g_plain, = torch.autograd.grad(R.classification_loss(logits, target, loss).sum(), logits)
    g_first, = torch.autograd.grad(R.classification_loss(first, target, loss).sum(), logits)
    torch.testing.assert_close(g_first, g_plain, rtol=1e-12, atol=1e-12)


def _rmsprop_params(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (7, 7), (7,), (2, 7), (2,)]
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def test_lean_rmsprop_is_torch_rmsprop_bit_for_bit():
    """rules.RMSprop's step (five foreach calls) moves the parameters and the state exactly as
    torch.optim.RMSprop does, step after step (gradients of mixed scale, one of them a transposed
    view, one parameter without a gradient in one step), and its state dict loads into torch's
    and back."""
    from awd_nonnormal.tasks.rules import RMSprop

    ours, theirs = _rmsprop_params(0), _rmsprop_params(0)
    kw = dict(lr=3e-3, alpha=0.9, eps=1e-7)
    opt_ours, opt_theirs = RMSprop(ours, **kw), torch.optim.RMSprop(theirs, **kw)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        for k, (a, b) in enumerate(zip(ours, theirs)):
            if step == 2 and k == 3:
                a.grad = b.grad = None  # no gradient this step: neither moves it
                continue
            grad = torch.randn(a.shape[::-1] if a.dim() == 2 else a.shape, generator=g) * 10.0 ** (k - 2)
            grad = grad.t() if a.dim() == 2 else grad  # a non-contiguous gradient
            a.grad, b.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_theirs.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
        sd_ours, sd_theirs = opt_ours.state_dict(), opt_theirs.state_dict()
        assert sd_ours["param_groups"] == sd_theirs["param_groups"]
        for i, st in sd_theirs["state"].items():
            assert set(sd_ours["state"][i]) == set(st) == {"step", "square_avg"}
            for key in st:
                assert torch.equal(sd_ours["state"][i][key], st[key])
                assert sd_ours["state"][i][key].dtype == st[key].dtype
    # the state dicts move between the two optimizers
    again = RMSprop(_rmsprop_params(0), **kw)
    again.load_state_dict(opt_theirs.state_dict())
    assert torch.equal(again.state[again.param_groups[0]["params"][1]]["square_avg"],
                       opt_theirs.state[theirs[1]]["square_avg"])


def test_lean_rmsprop_hands_other_options_to_torch():
    """With momentum, centring, weight decay or maximising, rules.RMSprop is torch's step."""
    from awd_nonnormal.tasks.rules import RMSprop

    for extra in (dict(momentum=0.5), dict(centered=True), dict(weight_decay=0.1), dict(maximize=True)):
        ours, theirs = _rmsprop_params(2), _rmsprop_params(2)
        opt_ours = RMSprop(ours, lr=1e-2, **extra)
        opt_theirs = torch.optim.RMSprop(theirs, lr=1e-2, **extra)
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            for a, b in zip(ours, theirs):
                a.grad = torch.randn(a.shape, generator=g)
                b.grad = a.grad.clone()
            opt_ours.step()
            opt_theirs.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), extra
        assert set(opt_ours.state[ours[0]]) == set(opt_theirs.state[theirs[0]]), extra


def test_lean_rmsprop_leaves_half_types_and_repeated_parameters_to_torch():
    """Half-precision parameters (a foreach multiply by a float rounds differently there) and a
    parameter listed twice (torch updates it twice in turn) take torch's own step, so they too
    match torch.optim.RMSprop bit for bit."""
    from awd_nonnormal.tasks.rules import RMSprop

    def drive(cls, make):
        g = torch.Generator().manual_seed(0)
        params = make(g)
        opt = cls(params, lr=1e-2, alpha=0.9, eps=1e-7)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            opt.step()
        return params, opt

    for dtype in (torch.bfloat16, torch.float16):
        def make(g, dtype=dtype):
            return [torch.randn(64, generator=g).to(dtype).requires_grad_()]
        (a,), opt_a = drive(RMSprop, make)
        (b,), opt_b = drive(torch.optim.RMSprop, make)
        assert torch.equal(a, b), dtype
        assert torch.equal(opt_a.state[a]["square_avg"], opt_b.state[b]["square_avg"]), dtype

    def make_twice(g):
        p = torch.randn(3, generator=g).requires_grad_()
        return [p, p]
    with pytest.warns(UserWarning, match="duplicate parameters"):
        (a, _), _ = drive(RMSprop, make_twice)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        (b, _), _ = drive(torch.optim.RMSprop, make_twice)
    assert torch.equal(a, b)


@pytest.mark.parametrize("extra", [{}, {"momentum": 0.9}])
def test_lean_rmsprop_runs_step_hooks_once(extra):
    """Pre- and post-step hooks fire once per step, on the lean path and on torch's (whose
    step carries its own hook wrapper once any torch RMSprop exists)."""
    from awd_nonnormal.tasks.rules import RMSprop

    torch.optim.RMSprop([torch.ones(1, requires_grad=True)])  # hooks torch's own step
    q = torch.ones(2, requires_grad=True)
    opt = RMSprop([q], lr=0.1, **extra)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    q.grad = torch.ones(2)
    opt.step()
    assert calls == ["pre", "post"]
