"""DINO (Caron et al. 2021): the loss, the centre, the teacher temperature's warm-up and the prototypes' freeze
against hand-computed values; the teacher reads only the global views; a tiny run trains and its checkpoint
holds the schedule the engine's progress set."""

import math

import pytest
import torch
from safetensors.torch import load_file

from hssl_cli.data.views import Views
from hssl_cli.losses import dino_cross_entropy
from hssl_cli.methods import build_method
from hssl_cli.methods.dino import teacher_temperature, updated_centre
from tests.conftest import METHOD_OVERRIDES

LN2, LN3 = math.log(2), math.log(3)
# two views of one image, K = 3: P_t(view 0) = (1/4, 1/4, 1/2), P_t(view 1) uniform (tau_t = 1, c = 0);
# P_s(view 0) uniform, P_s(view 1) = (1/2, 1/4, 1/4) (tau_s = 1)
TEACHER = torch.log(torch.tensor([[[1.0, 1.0, 2.0]], [[1.0, 1.0, 1.0]]]))
STUDENT = torch.log(torch.tensor([[[1.0, 1.0, 1.0]], [[2.0, 1.0, 1.0]]]))


def test_dino_cross_entropy_matches_hand_computed_values():
    # H(t0, s1) = -(1/4 ln 1/2 + 1/4 ln 1/4 + 1/2 ln 1/4) = 7/4 ln 2; H(t1, s0) = ln 3; the pairs' mean
    loss = dino_cross_entropy(STUDENT, TEACHER, torch.zeros(3), 1.0, 1.0)
    assert loss.item() == pytest.approx((7 / 4 * LN2 + LN3) / 2, abs=1e-6)


def test_dino_cross_entropy_centres_and_sharpens_the_teacher_only():
    # c = (0, 0, ln 2): P_t(view 0) uniform -> H(t0, s1) = 5/3 ln 2; P_t(view 1) = (2, 2, 1)/5 against uniform: ln 3
    centred = dino_cross_entropy(STUDENT, TEACHER, torch.tensor([0.0, 0.0, LN2]), 1.0, 1.0)
    assert centred.item() == pytest.approx((5 / 3 * LN2 + LN3) / 2, abs=1e-6)
    # tau_t = 1/2: P_t(view 0) = (1, 1, 4)/6 -> H(t0, s1) = 11/6 ln 2; view 1 stays uniform
    sharpened = dino_cross_entropy(STUDENT, TEACHER, torch.zeros(3), 1.0, torch.tensor(0.5))
    assert sharpened.item() == pytest.approx((11 / 6 * LN2 + LN3) / 2, abs=1e-6)
    # tau_s = 1/2: P_s(view 1) = (4, 1, 1)/6, so H(t0, s1) = -(1/4 ln 2/3 + 3/4 ln 1/6); P_s(view 0) stays uniform
    student_sharpened = dino_cross_entropy(STUDENT, TEACHER, torch.zeros(3), 0.5, 1.0)
    expected = (-(math.log(2 / 3) / 4 + 3 / 4 * math.log(1 / 6)) + LN3) / 2
    assert student_sharpened.item() == pytest.approx(expected, abs=1e-6)


def test_dino_cross_entropy_averages_every_teacher_view_against_every_other_student_view():
    # a local view with uniform P_s: pairs (0, 1), (0, 2), (1, 0), (1, 2); the last three cost ln 3 each
    student = torch.cat([STUDENT, torch.zeros(1, 1, 3)]).requires_grad_()
    teacher = TEACHER.clone().requires_grad_()
    loss = dino_cross_entropy(student, teacher, torch.zeros(3), 1.0, 1.0)
    assert loss.item() == pytest.approx((7 / 4 * LN2 + 3 * LN3) / 4, abs=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0  # the teacher's output is a target


def test_dino_cross_entropy_refuses_shapes_that_do_not_pair_naming_them():
    with pytest.raises(ValueError, match=r"\(2, 1, 3\), \(3, 1, 3\)"):
        dino_cross_entropy(STUDENT, torch.cat([TEACHER, TEACHER[:1]]), torch.zeros(3), 1.0, 1.0)


def test_centre_moves_towards_the_teacher_batch_mean():
    # the mean over every teacher row (2 views x 1 image) is (1, 3, 3); c <- 0.9 (1, 0, 0) + 0.1 (1, 3, 3)
    teacher = torch.tensor([[[2.0, 4.0, 0.0]], [[0.0, 2.0, 6.0]]])
    centre = updated_centre(torch.tensor([1.0, 0.0, 0.0]), teacher, 0.9)
    assert torch.allclose(centre, torch.tensor([1.0, 0.3, 0.3]))


@pytest.mark.parametrize("epoch, expected", [(0, 0.04), (15, 0.055), (30, 0.07), (40, 0.07)])
def test_teacher_temperature_warms_up_linearly_then_stays(epoch, expected):
    assert teacher_temperature(epoch, 0.04, 0.07, 30) == pytest.approx(expected)


def test_without_warm_up_the_teacher_temperature_is_constant():
    assert teacher_temperature(0.0, 0.04, 0.07, 0) == 0.07


def _dino(tiny_recipe, *overrides: str):
    torch.manual_seed(0)
    return build_method(tiny_recipe(*METHOD_OVERRIDES["dino"], *overrides), in_channels=1)


def _views(local_views: int = 0) -> Views:
    generator = torch.Generator().manual_seed(0)
    globals_ = [torch.randn(6, 1, 16, 16, generator=generator) for _ in range(2)]
    locals_ = [torch.randn(6, 1, 8, 8, generator=generator) for _ in range(local_views)]
    return Views(globals_, [None, None], locals_, [None] * local_views, None)


def test_training_progress_sets_the_teacher_temperature_and_unfreezes_the_prototypes(tiny_recipe):
    # the tiny recipe trains 2 epochs; tau_t warms up from 0.04 to 0.07 over 2; the prototypes freeze for 0.5
    method = _dino(tiny_recipe)
    method(_views(), torch.Generator())["loss"].backward()
    assert method.teacher_output.temperature.item() == pytest.approx(0.04)
    assert method.projector.prototypes.grad.abs().sum() == 0  # a zero gradient: DDP sees every parameter used
    assert method.projector.mlp[0].weight.grad.abs().sum() > 0
    method.zero_grad()
    method.after_optimizer_step(0.5)  # epoch 1 of 2
    assert method.teacher_output.temperature.item() == pytest.approx(0.055)
    method(_views(), torch.Generator())["loss"].backward()
    assert method.projector.prototypes.grad.abs().sum() > 0


def test_the_teacher_reads_the_global_views_and_the_student_every_view(tiny_recipe):
    method = _dino(tiny_recipe, "views=[{}, {}, {size: 8, count: 3}]")
    seen = {"student": [], "teacher": []}
    method.backbone.register_forward_hook(lambda _, inputs, out: seen["student"].append(tuple(inputs[0].shape)))
    method.target["backbone"].register_forward_hook(
        lambda _, inputs, out: seen["teacher"].append(tuple(inputs[0].shape)))
    method(_views(local_views=3), torch.Generator())
    assert seen == {"student": [(12, 1, 16, 16), (18, 1, 8, 8)], "teacher": [(12, 1, 16, 16)]}


def test_the_centre_moves_in_training_only(tiny_recipe):
    method = _dino(tiny_recipe)
    method.eval()
    method(_views(), torch.Generator())
    assert method.teacher_output.centre.abs().sum() == 0
    method.train()
    method(_views(), torch.Generator())
    assert method.teacher_output.centre.abs().sum() > 0


def test_a_tiny_dino_run_trains_and_its_checkpoint_holds_the_schedule_it_reached(tmp_path, tiny_recipe):
    from hssl_cli.engine.train import pretrain

    recipe = tiny_recipe(*METHOD_OVERRIDES["dino+multicrop"], "train.epochs=1", "train.batch_size=256",
                         "method.warmup_teacher_temperature_epochs=2", "method.teacher_temperature=0.06")
    result = pretrain(recipe, tmp_path, device_name="cpu")
    assert result.steps == 5 and math.isfinite(result.final_loss)
    tensors = load_file(result.checkpoint)
    assert tensors["teacher_output.temperature"].item() == pytest.approx(0.05)  # epoch 1 of a 2-epoch warm-up
    assert tensors["teacher_output.centre"].abs().sum() > 0
    assert not torch.equal(tensors["target.projector.prototypes"], tensors["projector.prototypes"])  # an EMA
