"""Train the DEMO bundle models/demo-mr-bundle: a tiny 3-D UNet for the lungs of synthetic MR phantoms.

The bundle exists so that the node's MONAI bundle loader is tested end to end on a real, trained
Zoo-style bundle without downloading anything. It is trained here, on CPU, in a few minutes, on
jittered synthetic MR phantoms only. It has never seen a patient image: NOT for clinical use.

Training samples go through the bundle's own preprocessing (from configs/inference.json, file
loading removed exactly as the node removes it), so training and inference cannot drift apart;
labels are computed analytically at the centres of the network's voxels. The result is checked on
held-out phantoms through MonaiBundleModel, the node's own loader, and the Dice is written into
configs/metadata.json.

Usage: python scripts/train_demo_bundle.py [--steps 1500] [--bundle models/demo-mr-bundle]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd
from monai.utils import set_determinism

from dicom_ai_node.config import MonaiBundleConfig
from dicom_ai_node.inference.bundle import MonaiBundleModel, in_memory_preprocessing, read_bundle_config
from dicom_ai_node.phantoms import MRContrast, MRPhantom, PhantomGeometry
from dicom_ai_node.phantoms.ct import FEET_FIRST_AXIAL, HU_LUNG

BUNDLE = Path(__file__).resolve().parents[1] / "models" / "demo-mr-bundle"
LABELS = {"lungs": "SCT:39607008:Lung"}
SEED = 20260115
PATCH = (48, 48, 48)
# RAS <-> LPS: x and y change sign (the matrix is its own inverse).
_FLIP_XY = np.diag([-1.0, -1.0, 1.0, 1.0])


def random_phantom(rng: np.random.Generator, seed: int) -> MRPhantom:
    """A phantom with jittered anatomy, grid, orientation and contrast, so the net learns lungs, not one image."""
    distance = rng.uniform(60, 80)
    geometry = PhantomGeometry(
        body_semi_axes=(rng.uniform(140, 180), rng.uniform(95, 125)),
        lung_centres_x=(-distance + rng.uniform(-5, 5), distance + rng.uniform(-5, 5)),
        lung_centre_y=rng.uniform(-15, 5),
        lung_semi_axes=(rng.uniform(38, 52), rng.uniform(50, 70), rng.uniform(65, 95)),
        spine_centre=(rng.uniform(-5, 5), rng.uniform(70, 85)),
        spine_radius=rng.uniform(11, 18),
    )
    size = int(rng.integers(56, 129))
    slice_spacing = rng.uniform(3.0, 8.0)
    contrast = MRContrast(
        air=0.0,
        soft_tissue=rng.uniform(500, 1200),
        lung=rng.uniform(20, 180),
        bone=rng.uniform(200, 700),
    )
    return MRPhantom(
        slices=int(rng.uniform(180, 320) / slice_spacing),
        rows=size,
        columns=size,
        pixel_spacing=(rng.uniform(340, 440) / size,) * 2,
        slice_spacing=slice_spacing,
        orientation=FEET_FIRST_AXIAL if rng.random() < 0.3 else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        geometry=geometry,
        lung_z_centre=rng.uniform(-30, 30),
        contrast=contrast,
        noise_fraction=rng.uniform(0.01, 0.06),
        bias_per_100mm=tuple(rng.uniform(-0.15, 0.15, 3)),
        seed=seed,
    )


def training_sample(phantom: MRPhantom, preprocessing: Compose) -> dict[str, torch.Tensor]:
    """The phantom through the bundle's preprocessing, and its analytic lungs on the resulting voxel grid."""
    image = preprocessing({"image": phantom.volume().to_metatensor()})["image"]
    grid = np.meshgrid(*(np.arange(n) for n in image.shape[1:]), indexing="ij")
    voxels = np.stack([*grid, np.ones_like(grid[0])], axis=-1)
    points_lps = voxels @ (_FLIP_XY @ image.affine.numpy().astype(np.float64)).T
    label = phantom.hu_at(points_lps[..., :3]) == HU_LUNG
    return {"image": image.as_tensor(), "label": torch.from_numpy(label[np.newaxis].astype(np.float32))}


def held_out_phantoms() -> list[MRPhantom]:
    """The default anatomy on grids and contrasts unlike any single training case, plus a feet-first scan."""
    return [
        MRPhantom(slices=48, rows=128, columns=128, pixel_spacing=(2.8, 2.8), slice_spacing=5.0, seed=1),
        MRPhantom.feet_first(
            slices=60,
            rows=96,
            columns=112,
            pixel_spacing=(3.6, 3.4),
            slice_spacing=4.0,
            seed=2,
            lung_z_centre=15.0,
            contrast=MRContrast(soft_tissue=950.0, lung=110.0, bone=500.0),
            noise_fraction=0.04,
        ),
    ]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def main() -> None:
    arguments = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    arguments.add_argument("--bundle", type=Path, default=BUNDLE)
    arguments.add_argument("--steps", type=int, default=1500)
    arguments.add_argument("--phantoms", type=int, default=96)
    options = arguments.parse_args()

    started = time.perf_counter()
    set_determinism(seed=SEED)
    rng = np.random.default_rng(SEED)
    parser = read_bundle_config(options.bundle, torch.device("cpu"))
    preprocessing = in_memory_preprocessing(parser)
    network = parser.get_parsed_content("network_def")
    samples = [training_sample(random_phantom(rng, seed), preprocessing) for seed in range(options.phantoms)]
    print(f"{len(samples)} phantoms prepared in {time.perf_counter() - started:.0f} s")

    keys = ["image", "label"]
    crops = Compose(
        [
            SpatialPadd(keys, spatial_size=PATCH),
            RandCropByPosNegLabeld(keys, label_key="label", spatial_size=PATCH, pos=1, neg=1, num_samples=2),
        ]
    ).set_random_state(SEED)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.Adam(network.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=options.steps)
    network.train()
    for step in range(1, options.steps + 1):
        batch = crops(samples[int(rng.integers(len(samples)))])
        images = torch.stack([item["image"] for item in batch]).as_subclass(torch.Tensor)
        labels = torch.stack([item["label"] for item in batch]).as_subclass(torch.Tensor)
        optimiser.zero_grad()
        loss = loss_function(network(images), labels)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 25 == 0:
            print(f"step {step}/{options.steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")

    weights = options.bundle / "models" / "model.pt"
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), weights)
    trained = time.perf_counter() - started
    print(f"wrote {weights} ({weights.stat().st_size / 1024:.0f} KiB) after {trained:.0f} s")

    model = MonaiBundleModel("demo-mr", MonaiBundleConfig(path=options.bundle, device="cpu", labels=LABELS))
    scores = []
    for phantom in held_out_phantoms():
        volume = phantom.volume()
        segmentation = model.predict(volume)
        scores.append(dice(segmentation.masks[0], phantom.lung_mask(volume.affine, volume.shape)))
        print(f"held-out {phantom.patient_position} {volume.shape}: lung Dice {scores[-1]:.3f}")
    metadata_path = options.bundle / "configs" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["eval_metrics"] = {"mean_dice": round(float(np.mean(scores)), 3)}
    metadata_path.write_text(json.dumps(metadata, indent=4) + "\n")
    print(f"mean held-out Dice {np.mean(scores):.3f}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
