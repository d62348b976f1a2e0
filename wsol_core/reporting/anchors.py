"""Published numbers the runs are shown beside, each with its source (percent)."""

from __future__ import annotations

from dataclasses import dataclass

_FMCG = (
    'W. Lee, M. Ki, C. Mun, S. Kho, H. Byun, "Foreground Mining via Contrastive Guidance for Weakly '
    'Supervised Object Localization" (BMVC-format paper; ../shared/seeds/000_bec529611bbc7461.txt)'
)
SOURCES: dict[str, str] = {
    "choe2020": (
        'J. Choe, S. J. Oh, S. Lee, S. Chun, Z. Akata, H. Shim, "Evaluating Weakly Supervised Object '
        "Localization Methods Right\", CVPR 2020; CAM's MaxBoxAccV2 as reprinted in FMCG Table 5 "
        "(and per IoU for VGG16 / CUB in CAML Table 1)"
    ),
    "choe2020_best": (
        "Choe et al., CVPR 2020: the best WSOL method per backbone and dataset, as reprinted in "
        'C2AM Table 3 ("Best WSOL")'
    ),
    "fmcg_t1": f"{_FMCG}, Table 1 (ablation, VGG16 on CUB-200-2011)",
    "fmcg_t5": f"{_FMCG}, Table 5 (MaxBoxAccV2)",
    "fmcg_t6": f"{_FMCG}, Table 6 (GT-known Loc / Top-1 Loc)",
    "cam_fmcg_t6": (
        f'B. Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016; CAM\'s '
        f"GT-known / Top-1 Loc at the original fixed CAM threshold, as tabulated in {_FMCG}, Table 6"
    ),
    "caml_t1": (
        'M. Ki, Y. Uh, J. Choe, H. Byun, "Contrastive Attention Maps for Self-supervised '
        'Co-localization", ICCV; Table 1 (MaxBoxAccV2 per IoU, VGG16 on CUB-200-2011)'
    ),
    "c2am_t3": (
        'J. Xie, J. Xiang, J. Chen, X. Hou, X. Zhao, L. Shen, "C2AM: Contrastive learning of '
        "Class-agnostic Activation Map for Weakly Supervised Object Localization and Semantic "
        'Segmentation", CVPR; Table 3 (MaxBoxAccV2)'
    ),
    "c2am_t2": ("Xie et al. (C2AM), CVPR; Table 2 (GT-known Loc, supervised pre-training, class-agnostic maps)"),
}


@dataclass(frozen=True)
class Anchor:
    """One published result. ``None`` where the source does not report the number."""

    method: str  # the project's method name where it has one: cam, fmcg, caml, c2am; else a label
    backbone: str  # vgg16, resnet50, inception_v3
    dataset: str  # cub, imagenet
    source: str  # key of SOURCES
    maxboxacc_v2: float | None = None
    boxacc_v2_iou30: float | None = None
    boxacc_v2_iou50: float | None = None
    boxacc_v2_iou70: float | None = None
    gt_known_loc: float | None = None  # one box per image (largest contour), IoU >= 0.5
    top1_loc: float | None = None
    maxboxacc_v1: float | None = None  # the protocol's original MaxBoxAcc (largest contour, IoU 0.5)
    pxap: float | None = None  # OpenImages
    label: str = ""  # row label; default: the method in capitals

    @property
    def display(self) -> str:
        return self.label or self.method.upper()


# Numbers copied from the tables named in SOURCES (percent).
ANCHORS: tuple[Anchor, ...] = (
    # CAM baseline, the protocol paper's MaxBoxAccV2 (FMCG Table 5; CAML Table 1 for the IoU split).
    Anchor("cam", "vgg16", "cub", "choe2020", 63.7, 96.77, 73.14, 21.23),
    Anchor("cam", "inception_v3", "cub", "choe2020", 56.7),
    Anchor("cam", "resnet50", "cub", "choe2020", 63.0),
    Anchor("cam", "vgg16", "imagenet", "choe2020", 60.0),
    Anchor("cam", "inception_v3", "imagenet", "choe2020", 63.4),
    Anchor("cam", "resnet50", "imagenet", "choe2020", 63.7),
    # CAM at the original fixed threshold (FMCG Table 6): a different protocol, shown for reference.
    Anchor("cam", "vgg16", "cub", "cam_fmcg_t6", gt_known_loc=56.00, top1_loc=44.15, label="CAM (fixed threshold)"),
    Anchor(
        "cam", "inception_v3", "cub", "cam_fmcg_t6", gt_known_loc=55.10, top1_loc=43.70, label="CAM (fixed threshold)"
    ),
    Anchor("cam", "resnet50", "cub", "cam_fmcg_t6", top1_loc=49.41, label="CAM (fixed threshold)"),
    Anchor(
        "cam", "vgg16", "imagenet", "cam_fmcg_t6", gt_known_loc=57.72, top1_loc=42.80, label="CAM (fixed threshold)"
    ),
    Anchor(
        "cam",
        "inception_v3",
        "imagenet",
        "cam_fmcg_t6",
        gt_known_loc=62.68,
        top1_loc=46.30,
        label="CAM (fixed threshold)",
    ),
    Anchor(
        "cam", "resnet50", "imagenet", "cam_fmcg_t6", gt_known_loc=51.86, top1_loc=38.99, label="CAM (fixed threshold)"
    ),
    # Best WSOL method of the protocol paper (C2AM Table 3).
    Anchor("best-wsol", "vgg16", "cub", "choe2020_best", 66.3, label="Best WSOL (Choe et al.)"),
    Anchor("best-wsol", "inception_v3", "cub", "choe2020_best", 58.8, label="Best WSOL (Choe et al.)"),
    Anchor("best-wsol", "resnet50", "cub", "choe2020_best", 66.4, label="Best WSOL (Choe et al.)"),
    Anchor("best-wsol", "vgg16", "imagenet", "choe2020_best", 60.6, label="Best WSOL (Choe et al.)"),
    Anchor("best-wsol", "inception_v3", "imagenet", "choe2020_best", 63.9, label="Best WSOL (Choe et al.)"),
    Anchor("best-wsol", "resnet50", "imagenet", "choe2020_best", 63.7, label="Best WSOL (Choe et al.)"),
    # FMCG: Table 5 (MaxBoxAccV2; Table 1 for the IoU split of VGG16 / CUB) and Table 6.
    Anchor("fmcg", "vgg16", "cub", "fmcg_t1", 80.50, 99.00, 88.63, 53.88, top1_loc=65.60),
    Anchor("fmcg", "inception_v3", "cub", "fmcg_t5", 75.8),
    Anchor("fmcg", "resnet50", "cub", "fmcg_t5", 73.3),
    Anchor("fmcg", "vgg16", "imagenet", "fmcg_t5", 65.3),
    Anchor("fmcg", "inception_v3", "imagenet", "fmcg_t5", 64.8),
    Anchor("fmcg", "resnet50", "imagenet", "fmcg_t5", 65.5),
    Anchor("fmcg", "vgg16", "cub", "fmcg_t6", gt_known_loc=88.54, top1_loc=65.60),
    Anchor("fmcg", "inception_v3", "cub", "fmcg_t6", gt_known_loc=87.95, top1_loc=64.72),
    Anchor("fmcg", "resnet50", "cub", "fmcg_t6", gt_known_loc=85.17, top1_loc=69.71),
    Anchor("fmcg", "vgg16", "imagenet", "fmcg_t6", gt_known_loc=65.04, top1_loc=48.01),
    Anchor("fmcg", "inception_v3", "imagenet", "fmcg_t6", gt_known_loc=66.86, top1_loc=50.63),
    Anchor("fmcg", "resnet50", "imagenet", "fmcg_t6", gt_known_loc=66.46, top1_loc=52.59),
    # CAML (label-free co-localization), VGG16 on CUB.
    Anchor("caml", "vgg16", "cub", "caml_t1", 77.06, 96.42, 84.15, 50.60),
    # C2AM (class-agnostic maps).
    Anchor("c2am", "vgg16", "cub", "c2am_t3", 81.4),
    Anchor("c2am", "inception_v3", "cub", "c2am_t3", 82.4),
    Anchor("c2am", "resnet50", "cub", "c2am_t3", 83.8),
    Anchor("c2am", "vgg16", "imagenet", "c2am_t3", 66.3),
    Anchor("c2am", "inception_v3", "imagenet", "c2am_t3", 65.8),
    Anchor("c2am", "resnet50", "imagenet", "c2am_t3", 66.8),
    Anchor("c2am", "vgg16", "cub", "c2am_t2", gt_known_loc=75.34),
    Anchor("c2am", "resnet50", "cub", "c2am_t2", gt_known_loc=89.99),
    Anchor("c2am", "vgg16", "imagenet", "c2am_t2", gt_known_loc=63.41),
    Anchor("c2am", "resnet50", "imagenet", "c2am_t2", gt_known_loc=65.89),
)

# FMCG Table 1 (VGG16, CUB-200-2011): switches (SRD, CG, PNL) -> MaxBoxAccV2 at 0.3/0.5/0.7, mean, Top-1 Loc.
FMCG_TABLE1: tuple[tuple[str, dict[str, bool], tuple[float, float, float, float, float]], ...] = (
    ("Baseline (reproduced)", {"srd": False, "cg": False, "pnl": False}, (97.58, 78.91, 34.64, 70.38, 59.87)),
    ("Ours", {"srd": True, "cg": True, "pnl": True}, (99.00, 88.63, 53.88, 80.50, 65.60)),
    ("- SRD", {"srd": False, "cg": True, "pnl": True}, (98.65, 86.05, 46.84, 77.18, 64.22)),
    ("- CG", {"srd": True, "cg": False, "pnl": True}, (98.29, 83.07, 41.58, 74.31, 62.67)),
    ("- PNL", {"srd": True, "cg": True, "pnl": False}, (98.58, 86.78, 47.26, 77.54, 63.98)),
)

KNOWN_BACKBONES = ("vgg16", "resnet50", "inception_v3")
KNOWN_DATASETS = ("cub", "imagenet")
PROTOCOL_INTERVAL = 0.001  # Choe et al.'s CAM threshold step


def normalize_dataset(name: str) -> str:
    """``CUB-200-2011`` / ``cub200`` -> ``cub``; ``ILSVRC2012`` / ``imagenet-1k`` -> ``imagenet``."""
    lowered = (name or "").strip().lower()
    if "cub" in lowered:
        return "cub"
    if "imagenet" in lowered or "ilsvrc" in lowered:
        return "imagenet"
    if "openimages" in lowered.replace("-", "").replace("_", ""):
        return "openimages"
    return lowered or "unknown"


def normalize_backbone(name: str) -> str:
    lowered = (name or "").strip().lower().replace("-", "_")
    aliases = {
        "vgg": "vgg16",
        "vgg16_gap": "vgg16",
        "inceptionv3": "inception_v3",
        "inception": "inception_v3",
        "resnet": "resnet50",
    }
    return aliases.get(lowered, lowered)


def select_anchors(method: str, backbone: str, dataset: str) -> tuple[list[Anchor], bool]:
    """Published rows to show beside a run, and whether they match its backbone and dataset.

    A backbone or dataset with no published numbers (``tiny``, ``synthetic``) falls back to the
    CAM baseline and the run's own method on every backbone / dataset, for orientation only.
    """
    bb, ds = normalize_backbone(backbone), normalize_dataset(dataset)
    matched = bb in KNOWN_BACKBONES and ds in KNOWN_DATASETS
    rows = [
        a
        for a in ANCHORS
        if (bb not in KNOWN_BACKBONES or a.backbone == bb) and (ds not in KNOWN_DATASETS or a.dataset == ds)
    ]
    if not matched:
        rows = [a for a in rows if a.method in {"cam", (method or "").lower()} and a.source != "cam_fmcg_t6"]
    rank = {"cam": 0, "best-wsol": 1}
    rows.sort(
        key=lambda a: (
            KNOWN_DATASETS.index(a.dataset),
            KNOWN_BACKBONES.index(a.backbone),
            rank.get(a.method, 2),
            a.method,
        )
    )
    return rows, matched
