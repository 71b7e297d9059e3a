"""Datasets: readers for the benchmark layouts people keep on disk, class names, seeded streams.

>>> from vlm_tta.data import get_dataset, list_datasets
>>> ds = get_dataset("imagenet_a", "/data")              # doctest: +SKIP
>>> ds.classnames[:2], len(ds)                           # doctest: +SKIP
(['stingray', 'goldfinch'], 7500)
>>> for image, label in ds.stream(seed=1):               # doctest: +SKIP
...     ...

Built-in datasets (``list_datasets()``): the ImageNet family (``imagenet``, ``imagenet_a``,
``imagenet_v2``, ``imagenet_r``, ``imagenet_sketch``), the 10 CoOp cross-datasets
(``caltech101``, ``dtd``, ``eurosat``, ``fgvc_aircraft``, ``flowers102``, ``food101``,
``oxford_pets``, ``stanford_cars``, ``sun397``, ``ucf101``) and the OOD sets (``inaturalist``,
``sun``, ``places``, ``textures``). TPT's ids (``I``, ``A``, ``V``, ``R``, ``K``, ``Flower102``,
``Cars``, ``Aircraft``, ``Pets``, ...) are aliases. Users' data: :class:`ImageFolderDataset`,
:class:`CsvDataset`, :class:`ImageDirDataset` (OOD), :class:`SplitJsonDataset`.
"""

# isort: off
# Importing the readers registers them; the import order is the listing order of list_datasets().
from . import imagenet as _imagenet  # noqa: F401
from . import coop as _coop  # noqa: F401
from . import ood as _ood  # noqa: F401

# isort: on
from .base import (
    IMAGE_EXTENSIONS,
    NOISY_LABEL,
    CorruptImageWarning,
    Dataset,
    DatasetWarning,
    Stream,
    permutation,
)
from .coop import SplitJsonDataset
from .custom import CsvDataset, ImageDirDataset, ImageFolderDataset, read_classnames
from .registry import (
    CheckReport,
    Reader,
    check_dataset,
    dataset_info,
    get_classnames,
    get_dataset,
    get_reader,
    get_templates_for,
    list_datasets,
    register_dataset,
    resolve_name,
)
from .resources import imagenet_classnames, imagenet_wnids
from .sampling import (
    NOISY_FRACTIONS,
    few_shot,
    load_noisy_mix,
    load_subset,
    noisy_mix,
    resample_indices,
    subset,
)

__all__ = [
    "Dataset",
    "Stream",
    "NOISY_LABEL",
    "NOISY_FRACTIONS",
    "IMAGE_EXTENSIONS",
    "DatasetWarning",
    "CorruptImageWarning",
    "permutation",
    "list_datasets",
    "get_dataset",
    "check_dataset",
    "dataset_info",
    "get_classnames",
    "get_templates_for",
    "get_reader",
    "resolve_name",
    "register_dataset",
    "Reader",
    "CheckReport",
    "ImageFolderDataset",
    "CsvDataset",
    "ImageDirDataset",
    "SplitJsonDataset",
    "read_classnames",
    "imagenet_classnames",
    "imagenet_wnids",
    "subset",
    "few_shot",
    "noisy_mix",
    "load_subset",
    "load_noisy_mix",
    "resample_indices",
]
