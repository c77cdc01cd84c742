"""experiments/model_table.py counts parameters and FLOPs as torchvision's own metadata does."""
import importlib.util
from pathlib import Path

import pytest
from torchvision.models import segmentation

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("model_table", ROOT / "experiments/model_table.py")
model_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model_table)


@pytest.mark.parametrize("fields, weights", [
    ({"name": "fcn_resnet", "backbone": "resnet50"},
     segmentation.FCN_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1),
    ({"name": "deeplabv3", "backbone": "resnet50"},
     segmentation.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1),
    ({"name": "deeplabv3", "backbone": "mobilenet_v3_large", "output_stride": 16,
      "rates": (12, 24, 36)},
     segmentation.DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1),
    ({"name": "lraspp"}, segmentation.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1)])
def test_counts_match_torchvision_metadata(fields, weights):
    # torchvision documents params and "GFLOPS" (multiply-accumulates) at its 520x520 eval size.
    cfg = model_table.model_config(None, fields)
    row = model_table.measure(cfg, 21, (520, 520))
    assert row["params"] == weights.meta["num_params"]
    assert row["gmacs"] == pytest.approx(weights.meta["_ops"], abs=5e-3)
    assert row["gflops"] == pytest.approx(2 * row["gmacs"])


def test_unet_parameter_count_is_the_papers():
    row = model_table.measure(model_table.model_config(model_table.unet, {}), 2, (572, 572))
    assert row["params"] == 31_037_698  # Ronneberger et al.: ~31M with 64 base channels
