"""Parallelism on torch.distributed: tensor-parallel and pipeline-parallel inference, replicated
serving, and calibration statistics summed across processes."""
