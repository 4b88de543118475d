import json
import math

import pytest
import torch
from torch import nn

from hssl_cli.data.views import Views
from hssl_cli.engine.train import pretrain
from hssl_cli.methods import build_method
from hssl_cli.methods.essl import RotationPredictionBranch, rotated_batch
from hssl_cli.recipe import EsslConfig, RecipeError

LOCAL_VIEW = "views=[{}, {}, {size: 8}]"
ESSL = "method.essl={head: [16]}"
BYOL = "method={name: byol, predictor: [64, 32]}"


def _views(batch: int = 6, local: int = 1, original: bool = False) -> Views:
    draw = torch.Generator().manual_seed(5)
    images = [torch.randn(batch, 1, 16, 16, generator=draw) for _ in range(2)]
    locals_ = [torch.randn(batch, 1, 8, 8, generator=draw) for _ in range(local)]
    x0 = torch.randn(batch, 1, 16, 16, generator=draw) if original else None
    return Views(images, [], locals_, [], x0)


@pytest.mark.parametrize("rotations", ["all", "one"])
def test_rotating_back_by_the_label_gives_the_original_images(rotations):
    images = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    rotated, labels = rotated_batch(images, rotations, torch.Generator().manual_seed(1))
    originals = images.repeat(4, 1, 1, 1) if rotations == "all" else images
    assert labels.dtype == torch.long and set(labels.tolist()) <= {0, 1, 2, 3}
    back = torch.stack([torch.rot90(image, -int(k), (-2, -1)) for image, k in zip(rotated, labels, strict=True)])
    assert torch.equal(back, originals)  # exact: a permutation of pixels, no interpolation
    if rotations == "all":
        assert labels.tolist() == [k for k in range(4) for _ in range(5)]
    else:  # drawn from the generator given: the same seed gives the same labels, another seed others
        again = rotated_batch(images, rotations, torch.Generator().manual_seed(1))[1]
        other = rotated_batch(torch.randn(64, 3, 8, 8), rotations, torch.Generator().manual_seed(2))[1]
        assert torch.equal(labels, again) and len(set(other.tolist())) == 4
    # label 1 is the counter-clockwise quarter-turn: the top-right pixel moves to the top-left
    first = labels.tolist().index(1) if 1 in labels.tolist() else None
    if first is not None:
        source = originals[first]
        assert torch.equal(rotated[first][:, 0, 0], source[:, 0, -1])


class Logits(nn.Module):
    """A backbone whose 'features' are given logits, one row per image in order."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.rows = rows

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.rows[: len(images)]


def test_rotation_loss_and_accuracy_match_a_hand_computation():
    branch = RotationPredictionBranch(4, EsslConfig(head=[], views="original", rotations="all", weight=0.5))
    branch.head = nn.Identity()  # logits = f(.)
    # one image, four rotations (labels 0, 1, 2, 3): rows right for k = 0 and 1, wrong for 2 and 3
    logits = torch.tensor([[2.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 3.0], [1.0, 0, 0, 0]])
    views = Views([torch.zeros(1, 1, 4, 4)] * 2, [], original=torch.zeros(1, 1, 4, 4))
    terms = branch(Logits(logits), views, torch.Generator())

    def nll(row: list[float], label: int) -> float:
        return -row[label] + math.log(sum(math.exp(value) for value in row))

    expected = sum(nll(row, k) for k, row in enumerate(logits.tolist())) / 4
    assert terms["loss/rotation"].item() == pytest.approx(expected, abs=1e-6)
    assert terms["essl/accuracy"].item() == pytest.approx(0.5)
    total = branch.add_to({"loss": torch.tensor(2.0)}, Logits(logits), views, torch.Generator())
    assert total["loss"].item() == pytest.approx(2.0 + 0.5 * expected, abs=1e-6)
    assert total["loss/invariance"].item() == 2.0


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_gradients_reach_the_backbone_and_the_rotation_head(tiny_recipe, method):
    base = [] if method == "simclr" else [BYOL]
    recipe = tiny_recipe(*base, LOCAL_VIEW, ESSL, "method.essl.weight=1.0")
    torch.manual_seed(0)
    model = build_method(recipe, in_channels=1)
    terms = model(_views(), torch.Generator())
    terms["loss/rotation"].backward()  # the branch's term alone
    head = [p.grad for p in model.essl.parameters()]
    backbone = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in head)
    assert any(g is not None and g.abs().sum() > 0 for g in backbone)
    assert all(p.grad is None for p in model.projector.parameters())  # the rotation term does not reach g


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_essl_null_is_the_base_method_and_its_base_loss_ignores_the_branch_views(tiny_recipe, method):
    base = [] if method == "simclr" else [BYOL]
    torch.manual_seed(0)
    plain = build_method(tiny_recipe(*base, "method.essl=null"), in_channels=1)
    torch.manual_seed(0)
    reference = build_method(tiny_recipe(*base), in_channels=1)
    assert plain.essl is None and plain.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), reference.state_dict().values(),
                                                 strict=True))
    torch.manual_seed(0)
    with_branch = build_method(tiny_recipe(*base, LOCAL_VIEW, ESSL), in_channels=1)
    shared = {key: value for key, value in with_branch.state_dict().items() if not key.startswith("essl.")}
    assert shared.keys() == reference.state_dict().keys()
    assert all(torch.equal(value, reference.state_dict()[key]) for key, value in shared.items())
    views = _views()
    with torch.no_grad():
        expected = reference(Views(views.global_views, []), torch.Generator())["loss"]
        both = with_branch(views, torch.Generator())
    # the local view feeds the rotation branch only: the base term is the base method's loss on the global views
    assert torch.allclose(both["loss/invariance"], expected, atol=1e-6)
    assert torch.allclose(both["loss"], expected + 0.4 * both["loss/rotation"], atol=1e-6)


def test_essl_composes_with_equimod(tiny_recipe):
    recipe = tiny_recipe("method.equimod={projector: [32, 16], param_embedding: 8}", ESSL,
                         "method.essl.views=original")
    assert recipe.method.consumes.original and not recipe.method.consumes.local_views
    from hssl_cli.data.augment import Augmenter
    from hssl_cli.recipe import AugmentConfig

    torch.manual_seed(0)
    model = build_method(recipe, in_channels=1)
    views = _views(original=True, local=0)
    sampler = Augmenter(AugmentConfig(), 16, torch.full((1,), 0.5), torch.full((1,), 0.5))
    views.global_params = [sampler.sample(6, torch.Generator().manual_seed(i), "cpu") for i in range(2)]
    with torch.no_grad():
        terms = model(views, torch.Generator())
    expected = terms["loss/invariance"] + terms["loss/equivariance"] + 0.4 * terms["loss/rotation"]
    assert torch.allclose(terms["loss"], expected, atol=1e-6)


@pytest.mark.parametrize(("overrides", "message"), [
    ([ESSL], "method.essl.views=local rotates the recipe's local views, which must share one size; views: has no "
             "local views. List them at one size, e.g. views: [{}, {}, {size: 8}]"),
    (["views=[{}, {}, {size: 8}, {size: 12}]", ESSL], "views: has local views at sizes [8, 12]"),
    ([BYOL, "method.essl={head: [60000, 60000], views: original}"],
     "method.essl.head: layers of widths [60000, 60000, 4] hold about 14 GiB"),
])
def test_a_recipe_the_branch_cannot_run_is_one_clear_error(tiny_recipe, overrides, message):
    with pytest.raises(RecipeError) as error:
        tiny_recipe(*overrides)
    assert message in str(error.value)


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_essl_trains_and_logs_its_loss_and_accuracy(tmp_path, tiny_recipe, method):
    base = [] if method == "simclr" else [BYOL]
    result = pretrain(tiny_recipe(*base, LOCAL_VIEW, ESSL, "train.epochs=1"), tmp_path, device_name="cpu")
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "essl/accuracy" in row]
    assert logged and all(0 <= row["essl/accuracy"] <= 1 for row in logged)
    assert all(row["loss"] == pytest.approx(row["loss/invariance"] + 0.4 * row["loss/rotation"], rel=1e-5)
               for row in logged)
