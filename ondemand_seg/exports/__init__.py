"""Export: a range of the generator's samples written to disk, resumably, as a Pascal VOC tree
(``voc``), WebDataset tar shards (``webdataset``) or a Hugging Face parquet dataset (``hf``).

- ``files``: whole-or-nothing writes, and the image and mask encodings every format shares;
- ``plan``: the export folder's plan, per-shard stats and metadata;
- ``voc``, ``wds``, ``hf``: one writer per format (the last two import their optional package);
- ``run``: the loop they share, :func:`export`;
- ``pseudo``: pseudo-labelled real images (a ``PseudoLabelledDataset``) written by the same writers;
- ``reader``: an export read back, :class:`ExportSource`, which the datasets' ``from_export`` serve.

``ondemand_seg.export(generator, out, n, ...)`` is :func:`~ondemand_seg.exports.run.export`: see
``docs/export.md``.
"""
from .plan import ExportError
from .reader import ExportSource
from .run import FORMATS, export

__all__ = ["FORMATS", "ExportError", "ExportSource", "export"]
