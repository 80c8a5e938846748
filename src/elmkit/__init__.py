"""elmkit: make large language models small enough for edge devices, and prove what it costs.

The public API (everything else lives in sub-packages)::

    from elmkit import finetune, FinetuneConfig, evaluate, EvalConfig, load_model
    from elmkit import compress, compare, CompareConfig, CalibConfig
    from elmkit import compress_elm, ElmCompressConfig, compress_recurrence, RecurrenceCompressConfig
    from elmkit import generate          # fast decoding (elmkit.infer)
    from elmkit import export, ExportConfig  # GGUF for llama.cpp (elmkit.export)
"""

__version__ = "0.1.0"

from .api import (  # noqa: E402
    ElmCompressConfig,
    RecurrenceCompressConfig,
    compress,
    compress_elm,
    compress_recurrence,
    demo,
    generate,
    info,
    pretrain,
    remove_layers,
    search,
)
from .compare import CompareConfig, compare, compress_method  # noqa: E402
from .data.calibration import CalibConfig  # noqa: E402
from .eval import EvalConfig, evaluate  # noqa: E402
from .export import ExportConfig, export  # noqa: E402
from .models import load_model, load_tokenizer  # noqa: E402
from .train import FinetuneConfig, finetune  # noqa: E402

__all__ = [
    "CalibConfig",
    "CompareConfig",
    "ElmCompressConfig",
    "EvalConfig",
    "ExportConfig",
    "FinetuneConfig",
    "RecurrenceCompressConfig",
    "__version__",
    "compare",
    "compress",
    "compress_method",
    "compress_elm",
    "compress_recurrence",
    "demo",
    "evaluate",
    "export",
    "finetune",
    "generate",
    "info",
    "load_model",
    "load_tokenizer",
    "pretrain",
    "remove_layers",
    "search",
]
