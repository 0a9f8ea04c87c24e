"""tensorwire.trainer: DDP training, export, INT8 quantization and the repository writer.

Steps (each a subcommand of the ``tensorwire`` script, see :mod:`.cli`):
``fit`` (:mod:`.launch` + :mod:`.worker`) -> ``export`` (:mod:`.export`) ->
``quantize`` (:mod:`.quantize`) -> ``publish`` (:mod:`.publish`). They share a
*run folder*: checkpoints, metrics log, exported files and reports.
"""

from tensorwire.trainer.errors import TrainerError

__all__ = ["TrainerError"]
