"""Meta-gradient estimators: antithetic truncated ES and PES over persistent inner problems."""
from selfopt.estimators.es import Estimate, EstimateSums, TruncatedES, finish
from selfopt.estimators.pes import PES, PESState
from selfopt.estimators.truncation import ConstantLength, LengthSchedule, LogUniformLength
from selfopt.estimators.inner_problem import InnerState, normalized_loss, unroll

__all__ = ["ConstantLength", "Estimate", "EstimateSums", "InnerState", "LengthSchedule",
           "LogUniformLength", "PES", "PESState", "TruncatedES", "finish", "normalized_loss",
           "unroll"]
