"""Export: a range of the generator's samples written to disk, resumably, as a Pascal VOC tree
(``voc``), WebDataset tar shards (``webdataset``) or a Hugging Face parquet dataset (``hf``).

- ``files``: whole-or-nothing writes, and the image and mask encodings every format shares;
- ``plan``: the export folder's plan, per-shard stats and metadata;
- ``voc``, ``wds``, ``hf``: one writer per format (the last two import their optional package);
- ``run``: the loop they share, :func:`export`.

``ondemand_seg.export(generator, out, n, ...)`` calls :func:`~ondemand_seg.export.run.export`, so
does this module when called: see ``docs/export.md``.
"""
import sys
import types

from .plan import ExportError
from .run import FORMATS, export

__all__ = ["FORMATS", "ExportError", "export"]


class _CallableModule(types.ModuleType):
    """``ondemand_seg.export`` is this package once any of its modules is imported (Python binds a
    sub-package to its parent's attribute), and the function ``export`` before: callable, the
    package is the function too, whichever way it was reached."""

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
