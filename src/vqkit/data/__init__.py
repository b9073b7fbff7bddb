"""Image data: folders of images, the bundled Fluent Emoji 3D set, and the LightningDataModule.

``ImageDataModule`` needs Lightning (the ``train`` extra); the rest needs only torch and Pillow,
so it is imported lazily.
"""

from .bundled import (
    DATASETS,
    FLUENT_EMOJI_3D,
    NpmDataset,
    default_cache_dir,
    fetch,
    fetch_fluent_emoji,
)
from .images import (
    IMAGE_EXTENSIONS,
    DataError,
    ImageFolderDataset,
    UnreadableImageError,
    color_jitter,
    find_images,
    load_image,
    scan_images,
    to_rgb,
)
from .split import group_key, split_by_group


def __getattr__(name: str):  # PEP 562: keep `import vqkit.data` free of Lightning
    if name == "ImageDataModule":
        from .datamodule import ImageDataModule

        return ImageDataModule
    if name == "ShapeDataModule":
        from .sparse3d import ShapeDataModule

        return ShapeDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DATASETS",
    "DataError",
    "FLUENT_EMOJI_3D",
    "IMAGE_EXTENSIONS",
    "ImageDataModule",
    "ImageFolderDataset",
    "NpmDataset",
    "UnreadableImageError",
    "color_jitter",
    "default_cache_dir",
    "fetch",
    "fetch_fluent_emoji",
    "find_images",
    "group_key",
    "load_image",
    "scan_images",
    "ShapeDataModule",
    "split_by_group",
    "to_rgb",
]
