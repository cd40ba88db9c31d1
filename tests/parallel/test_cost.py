"""The parallel cost model: invariants it must keep, and the CLI that prints it."""

import dataclasses

import pytest

from slimlm.parallel.cost import DEVICES, LINKS, SHAPES, Layout, Link, PlanParallelConfig, plan, predict

H200, NVLINK = DEVICES["h200"], LINKS["nvlink"]
LLAMA70 = SHAPES["llama-3-70b"]


def test_memory_bound_decode_scales_with_tensor_parallelism_on_a_free_link():
    free = Link(bandwidth_gbs=1e9, latency_us=0.0)
    one = predict(LLAMA70, H200, free, Layout(1, 1, 1), batch=1)
    two = predict(LLAMA70, H200, free, Layout(2, 1, 1), batch=1)
    assert two.latency_ms == pytest.approx(one.latency_ms / 2, rel=0.15)
    assert two.memory_gb < 0.6 * one.memory_gb and two.comm_share < 1e-6


def test_a_slow_link_makes_tensor_parallelism_pay():
    slow = Link(bandwidth_gbs=1.0, latency_us=500.0)
    assert predict(LLAMA70, H200, slow, Layout(8, 1, 1), batch=1).latency_ms > \
        predict(LLAMA70, H200, NVLINK, Layout(8, 1, 1), batch=1).latency_ms * 5


def test_the_pipeline_bubble_costs_latency_but_not_memory():
    single = predict(LLAMA70, H200, NVLINK, Layout(1, 1, 1), batch=1)
    piped = predict(LLAMA70, H200, NVLINK, Layout(1, 4, 1), batch=1)
    assert piped.latency_ms >= single.latency_ms  # one token crosses every stage in turn
    assert piped.memory_gb < single.memory_gb / 3


def test_replicas_multiply_throughput_not_latency():
    shape = dataclasses.replace(SHAPES["llama-3-8b"])
    one = predict(shape, H200, NVLINK, Layout(1, 1, 1), batch=8)
    two = predict(shape, H200, NVLINK, Layout(1, 1, 2), batch=16)
    assert two.throughput == pytest.approx(2 * one.throughput, rel=1e-6)
    assert two.latency_ms == pytest.approx(one.latency_ms)


def test_70b_on_8_h200_plans_a_layout_that_fits():
    predictions = plan(LLAMA70, PlanParallelConfig(bits=16, batch=64))
    assert not predict(LLAMA70, H200, NVLINK, Layout(1, 1, 1), batch=64, context=2048).fits  # 141 GB of bf16
    assert predictions[0].fits and predictions[0].layout.devices == 8


def test_plan_parallel_prints_a_recommendation(capsys):
    from slimlm.cli import main

    assert main(["plan-parallel", "llama-3-70b", "--nodes", "2", "--bits", "4.5"]) == 0
    out = capsys.readouterr().out
    assert "for throughput:" in out and "tp" in out
    code = main(["plan-parallel", "llama-3-70b", "--device", "tpu"])
    assert code == 2 and "device 'tpu' is not known" in capsys.readouterr().err
