"""Tests every registered task space passes, parametrized over ``SPACES`` at collection time.

A new space file is tested the moment it is registered: the per-view step equals the joint step
(the property ``opera.engine.step`` relies on), it can fit a fixed batch, its loss reaches its own
parameters and never the momentum teacher, its keys derive from its name, ``representations()``
gives every representation it published with the published width, a missing label set and a bad
option are one-line errors.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from opera.errors import OperaError
from opera.hierarchy import SupervisionHierarchy, parse_spec
from opera.supervisions import SPACES
from opera.supervisions.base import BuildContext, Progress, SpaceOutput, Stage, TaskSpace

LABEL_SETS = {"class": 4, "coarse": 2}
NAMES = SPACES.names()


def spec_for(name: str) -> str:
    """The smallest hierarchy holding ``name``: itself, over ``self`` when it sits above it."""
    cls = SPACES.get(name)
    spaces = [name] if cls.level <= SPACES.get("self").level else ["self", name]
    return ",".join(parse_spec(spaces))


def options_for(spec: str) -> dict:
    small = {"self": {"dim": 16, "mlp_dim": 32}}
    out = {}
    for n in parse_spec(spec):
        fields = {f.name for f in dataclasses.fields(SPACES.get(n).Options)}
        opts = dict(small.get(n, {}))
        for key, value in (("hidden", 16), ("mlp_dim", 32), ("dim", 16)):
            if key in fields and key not in opts:
                opts[key] = value
        out[n] = opts
    return out


def build(name: str, seed: int = 0) -> SupervisionHierarchy:
    torch.manual_seed(seed)
    spec = spec_for(name)
    vit = SPACES.get(name).token_only
    return SupervisionHierarchy.from_spec(
        spec, backbone="vit_tiny" if vit else "resnet_tiny", label_sets=LABEL_SETS, img_size=16 if vit else 32,
        backbone_options={"depth": 1, "patch_size": 8} if vit else None, **options_for(spec))


def batch(h: SupervisionHierarchy, n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    size = 16 if h.describe()["backbone"]["name"].startswith("vit") else 32
    views = [torch.randn(n, 3, size, size, generator=g) for _ in range(2)]
    targets = {k: torch.randint(0, c, (n,), generator=g) for k, c in LABEL_SETS.items()}
    return views, targets


def grads(h: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in h.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("partly_labelled", [False, True], ids=["labelled", "partly-labelled"])
@pytest.mark.parametrize("name", NAMES)
def test_per_view_step_equals_the_joint_step(name, partly_labelled):
    """Backward view by view (reusing the step's teacher outputs and masks) = backward of the joint
    loss; also with images without labels (-1 in every label set: --labels, --unlabelled)."""
    h = build(name)
    views, targets = batch(h)
    if partly_labelled:
        targets = {k: v.index_fill(0, torch.tensor([0, 3, 4, 6]), -1) for k, v in targets.items()}
    if SPACES.get(name).joint_only:
        _joint_only_runs_jointly(h, views, targets)
        return
    joint = copy.deepcopy(h)
    torch.manual_seed(5)
    out = joint(views=views, targets=targets)
    out.loss.backward()
    torch.manual_seed(5)
    first = h(views=views, targets=targets, view_ids=[0])
    first.loss.backward()
    second = h(view_ids=[1], state=first.state)
    second.loss.backward()
    torch.testing.assert_close(first.loss + second.loss, out.loss, rtol=1e-5, atol=1e-6)
    for k, v in out.logs.items():
        part = first.logs.get(k, 0) + second.logs.get(k, 0)
        torch.testing.assert_close(torch.as_tensor(part, dtype=v.dtype), v, rtol=1e-5, atol=1e-6, msg=k)
    g_joint, g_parts = grads(joint), grads(h)
    assert g_joint.keys() == g_parts.keys()
    for k in g_joint:
        torch.testing.assert_close(g_parts[k], g_joint[k], rtol=1e-4, atol=1e-6, msg=k)


def _joint_only_runs_jointly(h: SupervisionHierarchy, views, targets) -> None:
    """A space declared ``joint_only`` (its loss needs every view's batch at once) refuses a call
    over a subset of the views in one line, and the step (``train_step``, per_view on) runs it
    jointly: its gradients are those of one backward of the joint loss."""
    from opera.engine.step import train_step

    with pytest.raises(OperaError) as err:
        h(views=views, targets=targets, view_ids=[0])
    assert "\n" not in str(err.value) and "per_view=false" in str(err.value)
    joint = copy.deepcopy(h)
    torch.manual_seed(5)
    joint(views=views, targets=targets).loss.backward()
    opt = torch.optim.SGD([p for _, p in h.trainable_parameters()], lr=0.0)
    torch.manual_seed(5)
    train_step(h, h, opt, views, targets, lr=0.0, ema_momentum=1.0, device=torch.device("cpu"), amp="off", per_view=True)
    g_joint, g_step = grads(joint), grads(h)
    assert g_joint.keys() == g_step.keys() and g_joint
    for k in g_joint:
        torch.testing.assert_close(g_step[k], g_joint[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("name", NAMES)
def test_space_fits_a_fixed_batch(name):
    """A few SGD steps on one batch lower the space's own loss clearly (it is trainable)."""
    h = build(name)
    views, targets = batch(h, n=16)
    opt = torch.optim.SGD([p for _, p in h.trainable_parameters()], lr=0.05, momentum=0.9)
    losses = []
    for step in range(25):
        torch.manual_seed(step)
        h.momentum_update(0.9)
        out = h(views=views, targets=targets)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.losses[name].detach()))
    assert min(losses[-5:]) < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", NAMES)
def test_loss_reaches_the_space_and_never_the_teacher(name):
    h = build(name)
    views, targets = batch(h)
    h(views=views, targets=targets).losses[name].backward()
    own = [p for p in h.spaces[name].parameters() if p.requires_grad]
    assert own and any(p.grad is not None and p.grad.abs().sum() > 0 for p in own)
    if h.teacher is not None:
        assert all(not p.requires_grad and p.grad is None for p in h.teacher.parameters())
        trainable = {id(p) for _, p in h.trainable_parameters()}
        assert not any(id(p) in trainable for p in h.teacher.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_keys_derive_from_the_space_name(name):
    h = build(name)
    views, targets = batch(h)
    out = h(views=views, targets=targets)
    assert set(out.losses) == set(h.spaces)
    assert [k for k in out.logs if k.startswith(f"{name}/")], out.logs.keys()
    assert all(k.split("/")[0] in h.spaces for k in out.logs)


@pytest.mark.parametrize("name", NAMES)
def test_representations_hold_what_each_space_published(name):
    """``representations()`` (what ``diagnose`` measures) gives each space's published
    representations, with the published widths, and nothing unnamed."""
    h = build(name)
    h.eval()
    views, _ = batch(h)
    reps = h.representations(views[0])
    ctx_dims = _published(h)
    for rep, dim in ctx_dims.items():
        assert rep in reps and reps[rep].shape == (views[0].shape[0], dim), rep
    assert all(k == "backbone" or k.split("/")[0] in h.spaces for k in reps)


def _published(h: SupervisionHierarchy) -> dict[str, int]:
    """Rebuild the build context's published widths from a fresh build of the same spec."""
    seen: dict[str, int] = {}
    orig = BuildContext.publish

    def spy(self, name, dim, *a, **kw):
        seen[name] = dim
        return orig(self, name, dim, *a, **kw)

    BuildContext.publish = spy
    try:
        build(h.spec.split(",")[-1])
    finally:
        BuildContext.publish = orig
    return {k: v for k, v in seen.items() if k != "backbone"}


@pytest.mark.parametrize("name", [n for n in NAMES if "labels" in {f.name for f in dataclasses.fields(SPACES.get(n).Options)}])
def test_missing_label_set_is_one_line(name):
    spec = spec_for(name)
    vit = SPACES.get(name).token_only
    with pytest.raises(OperaError) as err:
        SupervisionHierarchy.from_spec(spec, backbone="vit_tiny" if vit else "resnet_tiny", label_sets={"other": 3},
                                       img_size=32, **options_for(spec))
    msg = str(err.value)
    assert "\n" not in msg and repr(name) in msg and "other" in msg


@pytest.mark.parametrize("name", NAMES)
def test_bad_option_and_repeated_space_are_one_line(name):
    spec = spec_for(name)
    with pytest.raises(OperaError) as err:
        SupervisionHierarchy.from_spec(spec, backbone="resnet_tiny", label_sets=LABEL_SETS, **{name: {"no_such_option": 1}})
    assert "\n" not in str(err.value) and f"{name}.no_such_option" in str(err.value)
    with pytest.raises(OperaError) as err:
        parse_spec(f"{spec},{name}")
    assert "\n" not in str(err.value) and "repeats" in str(err.value)


# ----------------------------------------------------------------------------- on_step
@dataclasses.dataclass
class _RecorderOptions:
    weight: float = 1.0


class _Recorder(TaskSpace):
    """A space whose loss is zero and which remembers every ``on_step`` call."""

    name = "recorder"
    level = 1
    Options = _RecorderOptions
    calls: list[Progress] = []

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    @classmethod
    def build(cls, ctx, options):
        return cls()

    def on_step(self, progress: Progress) -> None:
        type(self).calls.append(progress)

    def forward(self, stage: Stage, ids: list[int]) -> SpaceOutput:
        return SpaceOutput(0.0 * self.scale * sum(stage.get("backbone", ids)[0].sum() for _ in ids), {})


def test_the_loop_calls_on_step_before_every_step(tmp_path):
    """run_pretrain tells the spaces where training is: step 0..N-1, the fractional epoch, the totals."""
    from opera.configs import load_config
    from opera.engine.pretrain import run_pretrain

    SPACES.register("recorder")(_Recorder)
    _Recorder.calls = []
    try:
        cfg = load_config("cpu_digits", [
            "hierarchy=self,recorder", "train.epochs=2", "train.batch_size=256", "train.knn_every=0",
            "backbone.img_size=16", "self.mlp_dim=32", "self.dim=16", "data.spec=digits:0-1",
        ])
        run_pretrain(cfg, tmp_path / "run")
    finally:
        SPACES.unregister("recorder")
    calls = _Recorder.calls
    assert [c.step for c in calls] == list(range(len(calls))) and len(calls) >= 2
    assert all(c.total_steps == len(calls) and c.epochs == 2 for c in calls)
    per_epoch = len(calls) // 2
    assert calls[per_epoch].epoch == pytest.approx(1.0) and calls[1].epoch == pytest.approx(1 / per_epoch)
