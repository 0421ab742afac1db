"""Lightning callbacks of the template: pictures drawn from the evaluation (rank lists, embedding
projections), saved into the run directory and sent to image-capable loggers (W&B, TensorBoard)."""

from src.callbacks.embedding_projection import EmbeddingProjection
from src.callbacks.ranklist import RankListLogger

__all__ = ["EmbeddingProjection", "RankListLogger"]
