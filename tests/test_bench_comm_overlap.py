"""bench/comm_overlap.py's trace arithmetic: the NCCL kernel time that ran beside other kernels."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("comm_overlap", Path(__file__).resolve().parents[1] / "bench" / "comm_overlap.py")
comm_overlap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(comm_overlap)


def kernel(name, ts, dur, stream):
    return dict(cat="kernel", name=name, ts=ts, dur=dur, args=dict(stream=stream))


def test_union_and_overlap():
    assert comm_overlap.union([(5, 7), (0, 2), (1, 3), (3, 4)]) == [(0, 4), (5, 7)]
    assert comm_overlap.overlap([(0, 10)], [(2, 3), (2.5, 4), (9, 12)]) == 3.0  # 2..4 and 9..10
    assert comm_overlap.overlap([(0, 1), (5, 6)], [(1, 5)]) == 0.0


def test_nccl_overlap_from_a_trace():
    trace = {"traceEvents": [
        kernel("ncclDevKernel_ReduceScatter_Sum_f32", 100, 50, 20),   # 100..150
        kernel("ncclDevKernel_AllGather_RING_LL", 300, 40, 20),       # 300..340
        kernel("nvjet_sm90_tst_256x128", 120, 60, 7),                 # 120..180: 30 beside the first
        kernel("triton_poi_fused_mul", 320, 10, 7),                   # 10 beside the second
        dict(cat="cpu_op", name="ncclSomethingOnTheHost", ts=0, dur=1000),  # not a kernel
    ]}
    assert comm_overlap.nccl_overlap(trace) == (90, 40)
