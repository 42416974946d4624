"""User-facing errors. The CLI prints their message on one line and exits with code 2."""


class AsgaError(Exception):
    """A mistake in user input or environment; the message says what and how to fix it."""


class PolicyError(AsgaError):
    """A policy file is malformed, or does not fit the model or the target."""


class UnknownModelError(AsgaError):
    """A model name that is not registered."""


class DatasetError(AsgaError):
    """A dataset that cannot be found or does not fit the request."""


class CheckpointError(AsgaError):
    """A file that is not a checkpoint of the expected kind, or does not fit the model/policy."""


class OptionError(AsgaError):
    """An option value outside its allowed range (NaN, infinite, negative, too large, unknown word)."""


class OutputExistsError(AsgaError):
    """An output file exists and --force was not given."""


class OutputError(AsgaError):
    """An output location that cannot be written: a file in the way, a folder where a file belongs, no permission."""


class UnsupportedTargetError(AsgaError):
    """A backend target cannot represent what was asked for."""


class BudgetError(AsgaError):
    """A budget outside the feasible range, or one that the search could not meet."""


class TrainingDivergedError(AsgaError):
    """A NaN or infinite loss; the last good checkpoint is kept."""


class ExportError(AsgaError):
    """Export failed, or its result does not match the torch model within tolerance."""


class MissingDependencyError(AsgaError):
    """An optional dependency (onnx, onnxruntime, tensorrt, CUDA) is not available."""


def require(module: str, extra: str):
    """Return the imported module, or raise MissingDependencyError naming the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{module} is not installed: pip install 'asga-deploy[{extra}]' ({e})"
        ) from None
